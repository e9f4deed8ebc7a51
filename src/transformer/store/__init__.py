"""Reading and writing models on disk, below training and inference: model directories of every kind
(`modeldir`), and what kind of model a path holds (`kinds`)."""

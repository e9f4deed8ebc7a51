"""What a run shows people: sacreBLEU/chrF scores, training curves, attention maps."""

"""`transformer serve`: a translation service, or a language model's, over HTTP.

- `engine`: what decodes (our PyTorch model; an exported CTranslate2 model), behind one small interface.
- `batcher`: dynamic batching across requests on one model worker thread, with a queue cap and deadlines.
- `metrics`: Prometheus metrics, in a registry of each app's own.
- `app`: the FastAPI application (`POST /translate`, `POST /attention`, `GET /health`, `/metrics`, `/info`, `/`).
- `generator`, `lm_app`: a language model's server: continuous batching on a model thread, the OpenAI completions API.
- `server`: uvicorn on a socket bound beforehand, with a graceful drain on SIGTERM.
"""

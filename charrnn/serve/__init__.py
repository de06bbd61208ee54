"""`charrnn serve`: an HTTP server (FastAPI + uvicorn, the `serve` extra) for generating, steering and tracing text.

models.py: the served runs, each loaded once and looked up by name only; batcher.py: one step loop per
model that advances every active stream together (continuous batching); app.py: the routes, the
OpenAI-style completions endpoint, the limits and the one-line JSON errors. The page is charrnn/web/.
See docs/serve.md.
"""

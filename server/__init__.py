"""`sdxs-edge serve`: a local HTTP server with a page for real-time text-to-image and sketch-to-image.

    sdxs-edge serve [MODEL_OR_BUNDLE ...] [--runtime NAME[,NAME]] [--host 127.0.0.1] [--port 7860] [--api-key KEY]

`models` chooses and loads what is served (one `Entry` per bundle and runtime), `worker` runs each
session on its own thread behind a bounded queue, `app` holds the routes and the limits, `cli` the
subcommand. The static page is in `static/` (no CDN, fonts or scripts from outside). Importing this
package imports nothing heavy; `app` needs the `serve` extra (FastAPI, uvicorn), and no module here
imports PyTorch unless the torch runtime is chosen or a model folder must be converted.
"""

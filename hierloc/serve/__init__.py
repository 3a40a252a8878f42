"""`hierloc serve`: a loaded model behind an HTTP API and a page to try it in a browser.

`hierloc.serve.app` (the Starlette app: endpoints, limits, errors), `hierloc.serve.batching` (the bounded queue
and the worker that batches concurrent requests through the model), `hierloc.serve.server` (uvicorn on one
address: connection limit, graceful stop on SIGTERM or Ctrl-C), ``static/`` (the page, shipped in the
package: nothing is fetched from elsewhere). The server layer sits above inference and below the CLI.
"""

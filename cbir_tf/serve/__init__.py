"""The HTTP search service and its page (`python serve.py --index=INDEX`).

`service` holds what the service does (decode an upload, search, thumbnails) and is usable
without HTTP; `app` maps it onto routes (Starlette, served by uvicorn); `reload` switches the
service to each new committed state of its index.
"""

"""The HTTP layer: the FastAPI app and its routes (app.py), API keys (auth.py), the ASGI
middlewares (middleware.py) and how answers are sent (responding.py)."""

"""The HTTP layer: FastAPI app, routes, schemas. Imports the engine, never training or robustness code."""

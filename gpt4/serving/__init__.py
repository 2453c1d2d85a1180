"""OpenAI-compatible serving: protocol models, the continuous-batching engine, the FastAPI app, the chat page."""

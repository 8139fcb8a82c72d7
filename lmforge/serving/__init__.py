"""The service the Bento carries, and everything it imports: request and response protocol, middlewares,
the batching engine, chat templates, API keys, metrics and the model it serves (switched in place when
the champion changes). It imports nothing else of lmforge, so the Bento includes exactly this package."""

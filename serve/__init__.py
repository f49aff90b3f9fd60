"""Serving: the gateway in front of vLLM, and where the whole system is put together.

    gateway/       the OpenAI-compatible FastAPI app (routers, protocol, chat, relay, restyle, auth)
    routing.py     which version answers a name (alias, base, chat@<version>)
    reconcile.py   loads what routing says into the engine and swaps aliases without downtime
    engine.py      the vLLM engine manager (engine_child.py: its command line and process helpers)
    metrics.py     every Prometheus metric, the learner's read from the store at scrape time
    model.py       the embedded default model
    settings.py    the composed settings; cli.py, cli_serve.py, cli_model.py the commands; demo.py `make demo`
"""

"""The gateway: an OpenAI-compatible FastAPI app in front of vLLM (vLLM's entrypoints/openai shape).

    app.py              create_app(settings, *, engine, writer, registry) and the lifespan
    state.py, deps.py   the app's one typed state object and the route dependencies
    routes_*.py         thin module-level routers: chat + models, feedback, health/ready/metrics, admin
    protocol.py         request models, body reading, OpenAI-shaped errors
    chat.py             ChatService: route the name, call the engine, relay, log the turn
    relay.py            the stream relay and the turn recording shared by chat and restyle
    restyle.py          RestyleStep: an answer rewritten by a style's restyler
    auth.py             bearer keys and the loopback rule

Which version answers a name is decided in serve/routing.py; the engine is served by
serve/engine.py and kept in step with the registry by serve/reconcile.py.
"""

"""http: the HTTP layer, one request -> Outcome. `base.Transport` is the protocol the engines and the executor
call; `transport.HttpTransport` the real one, over the lean client (lean.py) and aiohttp (aio.py); `bodies`
the size cap and bounded decoding. Import the submodules: this package imports nothing (its constants are
read at start-up by config.py, which must not pull the clients in)."""

"""What the engine runs: the Llama module, loading, tokenizer, sampling, scheduler, runner, packages.

Nothing in this package imports Flask or gevent: the web side reaches it only through
``models.engine.Engine`` (submit / abort) and the per-request sink it passes in.
"""

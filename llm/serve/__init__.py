"""An OpenAI-compatible server (python -m llm.serve) that batches concurrent requests on the
static decode step. One role per file, as in nano-vllm:

    sequence.py   one completion being generated: prompt, sampling, stop, text so far
    scheduler.py  the waiting queue (bounded) and the slots (rows of the KV cache): admit, finish
    runner.py     the model on the static batch: prefill one row, one decode step for all rows
    engine.py     the loop, in a thread of its own: admit, step, sample, hand out text
    protocol.py   OpenAI's request bodies (checked), responses, stream chunks and errors
    api.py        the HTTP layer (starlette): routes, streaming, disconnects, keys
    __main__.py   the command: load, warm up, listen (uvicorn), shut down on SIGTERM
"""

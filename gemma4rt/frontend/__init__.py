"""frontend: the aiohttp front door. Receives HTTP requests, emits AddRequest/AbortRequest to the
scheduler, receives TokenOutputs and turns them into OpenAI responses (detokenization, stop strings,
parsers, SSE). Never imports torch.cuda."""

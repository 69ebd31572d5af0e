"""gemma4rt: an inference server for Google's Gemma 4 models.

Offline use:  from gemma4rt import LLM, SamplingParams
Server:       python -m gemma4rt.server --model-path PATH
"""
__version__ = "0.1.0"

from gemma4rt.protocol import SamplingParams  # noqa: E402  (light: msgspec only)


def __getattr__(name):
    if name == "LLM":
        from gemma4rt.llm import LLM
        return LLM
    if name == "GenerationOutput":
        from gemma4rt.llm import GenerationOutput
        return GenerationOutput
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "GenerationOutput", "__version__"]

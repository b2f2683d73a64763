"""tandem.serve: `from tandem.serve import LLM, SamplingParams`, as users of vLLM write."""

from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]

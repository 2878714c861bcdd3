"""The decoding engine: many models' requests (the base, LoRA and MixLoRA adapters of any
shapes) decoded together over ONE frozen base held in a `mixloom.model.AdapterModel`, with
the same multi-adapter layers and kernels as training, in eval mode. It knows nothing of
HTTP, the database or Redis.

What it does: continuous batching (requests join and leave between steps), one forward a
step for every running request, each token row through its own adapter; a paged KV cache;
chunked prefill (a long prompt is run `max_batch_tokens` at a time beside everyone's
decoding); per-request sampling (greedy, temperature, top_p, seed, stop strings and token
ids, n, logprobs); incremental text; adapters loaded on first use through a loader callback
and kept up to a byte budget (LRU).

Interface::

    from mixloom.inference import EngineConfig, InferenceEngine, SamplingParams

    engine = InferenceEngine(model, tokenizer, loader, EngineConfig(...))
    handle = engine.submit("ft:smollm2-135m:acme:x:ftjob-1", "Hello", SamplingParams(
        max_tokens=64, temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",), n=2, logprobs=3))
    for delta in handle:          # blocks; Delta(index, token, text, logprob, finish_reason)
        ...
    completion = handle.result()  # Completion(id, model, choices, usage)

- `loader(model_id)` returns the adapter's folder (mixloom's export, as written by
  `model.formats.save_adapter`), or None when the id names the base model; what it raises
  (an unknown id) fails that request alone: the handle re-raises it. It is called on the
  stepping thread, only when the adapter is not loaded.
- `submit` may be called from any thread and raises `mixloom.errors.GenerationError` (a
  `RequestError`: 400, with `param` and `code`) at once for an empty prompt, a prompt or
  max_tokens beyond the context, n or logprobs beyond the limits, bad sampling settings.
  `on_delta=callback` is also called, on the stepping thread, with each delta (an HTTP
  layer in another process can publish from there); `handle.cancel()` frees the request's
  rows at the next step.
- `engine.step()` runs one decoding step and returns `StepStats`; `engine.has_work` says
  whether there is anything to step. A worker that trains on the same AdapterModel calls
  `step()` between training steps, on its training thread (inference has priority: e.g.
  `while engine.has_work and time_left: engine.step()` before each training step). An
  inference-only process calls `engine.start()` (a thread that steps while there is work)
  and `engine.stop()`.
- `engine.release_memory()` frees the KV cache and unused adapters while idle;
  `engine.close()` cancels everything and unloads every inference adapter.

Sharing the model with training: inference adapters are named `infer:<n>` and packed apart
from the training jobs' weights (AdapterModel pack groups), so loading and evicting them
never moves a training job's parameters; a step runs under `torch.no_grad`, in eval mode,
and restores FusedState and the model's attention implementation as it found them. Training
results are bit for bit those without inference (tests/inference/test_engine_beside_training.py).

Text: `prompt` as text is encoded with the tokenizer's special tokens; chat prompts should be
rendered (chat template) and passed as token ids. Delta text never splits a character and
never shows a stop string; `Choice.text` excludes the stop string and stop tokens.
"""

from mixloom.inference.adapters import AdapterCache, Loader
from mixloom.inference.engine import InferenceEngine, StepStats
from mixloom.inference.outputs import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Choice,
    Completion,
    Delta,
    RequestHandle,
    TokenLogprob,
    Usage,
)
from mixloom.inference.params import EngineConfig, SamplingParams

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "AdapterCache",
    "Choice",
    "Completion",
    "Delta",
    "EngineConfig",
    "InferenceEngine",
    "Loader",
    "RequestHandle",
    "SamplingParams",
    "StepStats",
    "TokenLogprob",
    "Usage",
]

"""The engine: generation (prefill + cached decode), batching scheduler, sampling and text streaming."""

"""Our processor over the reference fixtures' checkpoints and cases, computed once per process
(the parity tests and the compiled-decode tests share them)."""
from __future__ import annotations

import functools

from deepseek_vl2.inputs.processor import DeepseekVL2Processor, ProcessedInputs
from tools.parity.reference_data import checkpoint_dir, load_case_inputs, reference_dir


@functools.lru_cache(maxsize=None)
def _processor_cached(root: str, config: str) -> DeepseekVL2Processor:
    return DeepseekVL2Processor.from_pretrained(checkpoint_dir(config))


def processor_for(config: str) -> DeepseekVL2Processor:
    """The processor of a config's checkpoint (loaded once per session)."""
    return _processor_cached(str(reference_dir()), config)


@functools.lru_cache(maxsize=None)
def _processed_cached(root: str, config: str, case: str) -> ProcessedInputs:
    conversation, images = load_case_inputs(case)
    return processor_for(config).process(conversation, images, system_prompt="")


def processed_case(config: str, case: str) -> ProcessedInputs:
    """Our processor's output for a case with a config's checkpoint (computed once per session).

    Callers must not modify the returned tensors.
    """
    return _processed_cached(str(reference_dir()), config, case)

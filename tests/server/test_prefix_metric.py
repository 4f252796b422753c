"""The prefix cache through Cog's real server: a follow-up turn reports, in its metrics, the
prompt tokens it reused from the turn before (``cached_input_token_count``)."""
from __future__ import annotations

import json

from tools.testing.cog_server import CogServer

QUESTION = "Name three rivers."


def test_a_follow_up_turn_reports_the_tokens_it_reused(cog_predictor: CogServer) -> None:
    status, first = cog_predictor.predict({"prompt": QUESTION, "temperature": 0, "max_length_tokens": 8})
    assert status == 200 and first["status"] == "succeeded", first
    answer = "".join(first["output"])
    messages = json.dumps([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}])
    status, second = cog_predictor.predict({"messages": messages, "prompt": "Which one is the longest?",
                                            "temperature": 0, "max_length_tokens": 8})
    assert status == 200 and second["status"] == "succeeded", second
    before, after = first["metrics"], second["metrics"]
    # the first turn shares at most the template's first tokens with the set-up request parked before it
    assert before["cached_input_token_count"] < before["input_token_count"] // 2
    # the follow-up reuses at least the whole first prompt, and prefills its new question
    assert before["input_token_count"] <= after["cached_input_token_count"] < after["input_token_count"]

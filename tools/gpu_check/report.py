"""The GPU check's table (gpu_check.md) from its report (gpu_check.json), complete or partial.

One line per stage says whether it finished, failed or was cut at its limit; the speed rows come
from the benchmark's ``row`` lines, so a variant cut at its limit still shows the rows it had
measured (the rows it had not are listed as missing).
"""
from __future__ import annotations

from typing import Any

ROW_KEYS = {"tiny": "decode,ttft,concurrency,prefix", "small": "decode,e2e_1428,memory", "base": "decode,ttft,e2e_demo,memory"}


def fmt(value: Any) -> str:
    """Three significant digits, or blank."""
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def stage_status(result: dict[str, Any]) -> str:
    """``finished in 12.3 s (limit 80 s)``, ``CUT at its limit …``, ``FAILED …``, ``skipped: …``."""
    if isinstance(result.get("skipped"), str):  # (the parity stage's "skipped" is a count)
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"ERROR: {result['error']}"
    if "seconds" not in result:
        return "not run"
    timing = f"{result['seconds']} s (limit {result.get('limit_seconds')} s, log logs/{result.get('log')})"
    if result.get("timed_out"):
        return f"CUT at its limit after {timing}: figures up to then only"
    if result.get("exit_code") not in (0, None):
        return f"FAILED (exit {result['exit_code']}) after {timing}"
    return f"finished in {timing}"


def speed_lines(stage: str, result: dict[str, Any], official: dict[str, Any]) -> list[str]:
    """The table rows of one speed stage."""
    variant = stage.split(":")[1]
    lines = []
    for row in result.get("rows", []):
        values = row["values"]
        fast = {m: v for m, v in values.items() if m != "eager"}
        fraction = row.get("bandwidth_fraction") or {}
        target = f"{'≥' if row['better'] == 'higher' else '≤'} {row['target']} {row['unit']}" if row["target"] else ""
        fast_text = ", ".join(f"{fmt(v)} ({m})" for m, v in fast.items())
        lines.append(f"| {variant} | {row['row']} | {target} | {fmt(values.get('eager', values.get('load')))} "
                     f"| {fast_text} | {fmt(fraction.get('eager'))} / "
                     f"{' '.join(fmt(fraction.get(m)) for m in fast) or ''} | {official_figure(official, row['key'])} |")
    missing = [key for key in ROW_KEYS[variant].split(",") if key not in {r["key"] for r in result.get("rows", [])}]
    if missing:
        lines.append(f"| {variant} | not measured: {', '.join(missing)} ({stage_status(result)}) | | | | | |")
    return lines


SETUP_GOAL = "goal on an H100, base from local weights: READY <= 60 s, compiling <= 20 s"


def setup_line(stage: str, setup: dict[str, Any]) -> str:
    """One variant's setup row: random build, compiles, CUDA graphs (random weights: READY needs the Cog stage)."""
    if setup.get("compiles") is None:
        return f"- {stage} setup: no compiled warm-up measured ({SETUP_GOAL})"
    fallback = f"; FELL BACK to eager: {setup['fallback']}" if setup.get("fallback") else ""
    return (f"- {stage} setup: build {fmt(setup.get('build_seconds'))} s, {setup['compiles']} compile(s) in "
            f"{fmt(setup.get('compile_seconds'))} s, {setup.get('graphs')} CUDA graph(s) in "
            f"{fmt(setup.get('graph_seconds'))} s using {fmt(setup.get('graph_memory_mib'))} MiB, path "
            f"{setup.get('path')}{fallback} ({SETUP_GOAL})")


def official_figure(official: dict[str, Any], key: str) -> str:
    """The official code's figure for a row, from the workload that measures the same thing."""
    for line in official.get("lines", []) if isinstance(official, dict) else []:
        workload = line.get("workload", "")
        if key in ("decode", "ttft") and "1 tile" in workload:
            return f"{line['decode_tok_s']} tok/s" if key == "decode" else f"{line['ttft_s']} s (~440 tokens)"
        if (key == "e2e_1428" and "1428" in workload) or (key == "e2e_demo" and "500 new" in workload):
            return f"{line['e2e_s']} s"
    return ""


def markdown(report: dict[str, Any]) -> str:
    """The table of every speed row measured so far, the sampled runs, parity, Cog, and each stage's status."""
    meta = report.get("meta", {})
    stages = [s for s in report if s != "meta"]
    lines = [f"# GPU check (call {meta.get('call')}) — {meta.get('date')}, {meta.get('device_name')}, "
             f"torch {meta.get('torch')}"
             + (" (DRY RUN on the CPU, reduced sizes: no figure here is a GPU figure)" if meta.get("dry_run") else ""),
             "", f"Command: `{meta.get('command')}`", "", "## Stages", ""]
    lines += [f"- {stage}: {stage_status(report[stage])}" for stage in stages]
    preflight = report.get("preflight", {})
    if "rung" in preflight:
        lines += ["", f"Decode path (preflight): **{preflight['rung']}** — {preflight['why']}."]
    speed = [s for s in stages if s.startswith("speed:")]
    if speed:
        lines += ["", "| variant | row | target | eager | faster rung | bandwidth fraction (eager / rung) | official |",
                  "|---|---|---|---|---|---|---|"]
        for stage in speed:
            official = report.get(stage.replace("speed:", "official:"), {})
            lines += speed_lines(stage, report[stage], official)
        for stage in speed:
            lines.append(setup_line(stage, report[stage].get("setup") or {}))
            for mode, run in report[stage].get("sampled", {}).items():
                lines.append(f"- {stage} sampled request ({mode}, temperature {run['temperature']}, top_p "
                             f"{run['top_p']}): {fmt(run['decode_tokens_per_second'])} tokens/s decode, "
                             f"TTFT {fmt(run['ttft_seconds'])} s")
            lines += [f"- {stage}: mode {f['mode']} FAILED in {f['where']}: {f['error'][:300]}"
                      for f in report[stage].get("mode_failed", [])]
            memory = report[stage].get("memory")
            if memory:
                measured = "n/a (CPU)" if memory["max_allocated"] is None else f"{memory['max_allocated'] / 2**30:.2f} GiB"
                lines.append(f"- {stage} memory: estimate {memory['estimate_allocated'] / 2**30:.2f} GiB allocated "
                             f"({memory['decode_states']} decode state(s); plan total {memory['plan']['total'] / 2**30:.2f} "
                             f"GiB with the CUDA runtime) vs torch.cuda.max_memory_allocated {measured}")
    parity = report.get("parity")
    if parity:
        if "passed" in parity:
            lines += ["", f"Reference parity on {meta.get('device')}: {parity['passed']} passed, {parity['failed']} "
                      f"failed, {parity['skipped']} skipped ({stage_status(parity)})."]
            lines += [f"- {failure}" for failure in parity.get("failures", [])[:10]]
        drift = parity.get("bf16_drift", {}).get("summary")
        if drift:
            lines.append(f"bf16 drift against the float32 reference: max |Δlogit| {drift['max_logit_diff']:.4f}, "
                         f"{drift['identical']}/{drift['cases']} greedy continuations identical.")
    cog = report.get("cog")
    if cog:
        lines.append(f"Cog HTTP server: {cog.get('summary') or stage_status(cog)}")
    return "\n".join(lines) + "\n"

"""The default model served by vLLM (its CPU build, .venv-vllm): bf16 against serq, side by side.

    .venv/bin/python benchmarks/serve.py                       # README's and docs/serving.md's numbers
    .venv/bin/python benchmarks/serve.py --concurrency 4 --max-tokens 8 --calib-windows 2   # a quick look

The default model (smollm2-135m) is quantized with ``serq quantize`` (MXFP4, the default
recipe; ``--format`` for INT) into ``--work`` once per ``--embeddings`` choice (the table as the
model has it, "serq", and int8 per row, "serq+int8 table"), then each model is served in turn by a real
``vllm serve`` process on 127.0.0.1 (bf16: the float folder; serq: the packed folder, both with
``--dtype bfloat16``), ``--cycles`` times over, the order rotated each cycle: a shared machine's
speed drifts by more than the differences measured, so each serq figure is compared with the
bf16 server of its own cycle, and the table gives the median of those ratios with their range. At each ``--concurrency`` level, that many clients each send
``--rounds`` completion requests one after another (streamed, greedy, ``ignore_eos`` so that
every request produces ``--max-tokens`` tokens), all on the same prompts. Measured per level:
output tokens/s (all requests' tokens over the level's wall time) and time to first token
(median and 90th percentile). Weight memory: the bytes vLLM holds for the weights (from the
folders' tensor headers: float tensors in the serving dtype, packed fields as stored, a tied
head once); and the server processes' peak resident memory (VmHWM), which adds vLLM's KV
cache (``VLLM_CPU_KVCACHE_SPACE`` GiB, the same for both) and runtime.

Writes benchmarks/results/serve_cpu.json (or ``--out``); a table last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
VLLM = ROOT / ".venv-vllm" / "bin" / "vllm"
MODEL = "smollm2-135m"
GIB = 2**30
PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper who",
    "Explain how a refrigerator works in simple terms:",
    "The three most important inventions of the twentieth century are",
    "def quicksort(items):",
    "In the middle of the ocean, a small island",
    "A recipe for bread needs flour, water,",
    "The main causes of the French Revolution were",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--cycles", type=int, default=3, help="times every model is served, in rotated order")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--format", default="mxfp4", choices=["mxfp4", "w4a8", "w4a4"])
    parser.add_argument("--embeddings", nargs="+", default=["float", "int8"], choices=["float", "int8"],
                        help="serq folders to serve, by how the embedding table is stored")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--work", type=Path, default=RESULTS / ".cache")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_cpu.json")
    return parser


def quantized(work: Path, fmt: str, windows: int, embeddings: str) -> Path:
    """The default model quantized by ``serq quantize`` (default recipe), made once per setting."""
    from serq_ao.integrations.serialization import is_quantized_folder

    out = work / f"{MODEL}-serq-{fmt}-{windows}w{'-int8-table' if embeddings == 'int8' else ''}"
    if not is_quantized_folder(out):
        command = [sys.executable, "-m", "serq_ao.cli.main", "quantize", MODEL, "--format", fmt, "--out", str(out),
                   "--calib-windows", str(windows), "--embeddings", embeddings]
        print("running", " ".join(command[2:]), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            sys.exit("serve.py: serq quantize failed")
    return out


def weight_bytes(folder: Path, dtype_bytes: int) -> int:
    """Bytes of the weights vLLM holds for ``folder``: floating tensors in the serving dtype,
    integer ones (packed codes and scales, orders) as stored; each stored tensor once."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                count = 1
                for size in tensor.get_shape():
                    count *= size
                stored = tensor.get_dtype()
                packed_scale = key.endswith(("_scale", "_scale_inv"))  # serq's float32 scales stay float32
                if stored in ("F32", "F16", "BF16") and not packed_scale:
                    total += count * dtype_bytes
                else:
                    total += count * {"F32": 4, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "F16": 2, "BF16": 2}[stored]
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``vllm serve`` process group on 127.0.0.1, stopped with SIGINT (what Ctrl-C sends)."""

    def __init__(self, folder: Path, args, log: Path):
        self.port, self.log = free_port(), log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
        command = [str(VLLM), "serve", str(folder), "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "bfloat16", "--max-model-len", "1024", "--served-model-name", "model"]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"serve.py: vllm serve exited with {self.process.returncode}; see {self.log}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(2)
        sys.exit(f"serve.py: vllm serve not healthy after {timeout} s; see {self.log}")

    def peak_rss_bytes(self) -> int:
        """Sum of the peak resident memory of the server's processes (front end, engine)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != self.process.pid:
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, ProcessLookupError):
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return total

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def one_request(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token in s, output tokens) of one streamed completion."""
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return first if first is not None else float("nan"), tokens


def load(port: int, concurrency: int, rounds: int, max_tokens: int) -> dict:
    """``concurrency`` clients, each sending ``rounds`` requests one after another."""
    results, lock = [], threading.Lock()

    def client(index: int) -> None:
        for r in range(rounds):
            measured = one_request(port, PROMPTS[(index + r) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(measured)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - start
    ttft = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "ttft_median_s": statistics.median(ttft),
            "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]}


def serve_and_measure(name: str, folder: Path, args) -> dict:
    log = args.work / f"serve_{name}.log"  # vLLM's own output, beside the quantized folders (not committed)
    print(f"serving {name}: {folder}", flush=True)
    server = Server(folder, args, log)
    try:
        server.wait_healthy()
        load(server.port, 2, 1, 4)  # warm-up: compiled graphs, first allocations
        levels = [load(server.port, c, args.rounds, args.max_tokens) for c in args.concurrency]
        peak = server.peak_rss_bytes()
    finally:
        server.stop()
    return {"folder": str(folder), "weight_bytes": weight_bytes(folder, 2), "server_peak_rss_bytes": peak,
            "levels": levels}


def summarize(cycles: list[dict[str, dict]], concurrency: list[int]) -> dict:
    """Per model: its cycles, the median of each level's figures over them, and (not bf16) the
    ratio of its output tokens/s to the same cycle's bf16 server, per cycle and their median."""
    models = {}
    for name in cycles[0]:
        runs = [cycle[name] for cycle in cycles]
        levels = []
        for i, level in enumerate(concurrency):
            entry = {"concurrency": level}
            for key in ("output_tokens_per_s", "ttft_median_s", "ttft_p90_s"):
                entry[key] = statistics.median(run["levels"][i][key] for run in runs)
            if name != "bf16":
                ratios = [cycle[name]["levels"][i]["output_tokens_per_s"] / cycle["bf16"]["levels"][i]["output_tokens_per_s"]
                          for cycle in cycles]
                entry["over_bf16_per_cycle"] = ratios
                entry["over_bf16_median"] = statistics.median(ratios)
            levels.append(entry)
        models[name] = {"folder": runs[0]["folder"], "weight_bytes": runs[0]["weight_bytes"],
                        "server_peak_rss_bytes": max(run["server_peak_rss_bytes"] for run in runs),
                        "levels": levels, "cycles": runs}
    return models


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vLLM (CPU) serving {MODEL}, bf16 vs serq {record['format']}, "
                  f"{record['machine']['processor']}, {record['machine']['cpus']} cores")
    for column in ("concurrency", "model", "output tok/s", "x bf16 (per cycle)", "TTFT median", "TTFT p90", "weights",
                   "x bf16", "server peak RSS"):
        table.add_column(column, justify="right")
    models = record["models"]
    for i, concurrency in enumerate(record["concurrency"]):
        for name, measured in models.items():
            level = measured["levels"][i]
            if name == "bf16":
                ratio = "1"
            else:
                low, high = min(level["over_bf16_per_cycle"]), max(level["over_bf16_per_cycle"])
                ratio = f"{level['over_bf16_median']:.2f} ({low:.2f}-{high:.2f})"
            table.add_row(str(concurrency), name, f"{level['output_tokens_per_s']:.0f}", ratio,
                          f"{level['ttft_median_s'] * 1000:.0f} ms",
                          f"{level['ttft_p90_s'] * 1000:.0f} ms", f"{measured['weight_bytes'] / 2**20:.0f} MiB",
                          f"{measured['weight_bytes'] / models['bf16']['weight_bytes']:.2f}",
                          f"{measured['server_peak_rss_bytes'] / GIB:.2f} GiB")
    Console().print(table)


def main() -> None:
    args = build_parser().parse_args()
    if args.cycles < 1:
        sys.exit(f"serve.py: --cycles must be at least 1, got {args.cycles}")
    if not VLLM.exists():
        sys.exit("serve.py: needs .venv-vllm (make vllm-env)")
    from serq_ao.models import resolve_model_folder

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    folders = {"bf16": resolve_model_folder(MODEL)}
    for embeddings in args.embeddings:
        name = "serq" if embeddings == "float" else "serq+int8 table"
        folders[name] = quantized(args.work, args.format, args.calib_windows, embeddings)
    names, cycles = list(folders), []
    for c in range(args.cycles):
        order = names[c % len(names):] + names[: c % len(names)]
        cycles.append({name: serve_and_measure(name, folders[name], args) for name in order})
    from serq_ao.bench import machine_info, write_json

    record = {"model": MODEL, "format": args.format, "embeddings": args.embeddings, "machine": machine_info(),
              "concurrency": args.concurrency, "rounds": args.rounds, "cycles": args.cycles,
              "max_tokens": args.max_tokens, "kv_cache_gib": args.kv_cache_gib,
              "models": summarize(cycles, args.concurrency)}
    write_json(args.out, record)
    print_table(record)


if __name__ == "__main__":
    main()

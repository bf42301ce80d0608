"""Re-run issue 18's audit on CPU with a tiny random model: every hostile input through the real CLI and server.

    PYTHONPATH=src python bench/audit18.py            (~3-6 min on 2 busy cores; JSON lines to $OUT/audit18.jsonl)

Each CLI case is `python -m lorafit ...` in a subprocess and is counted as one of: ok (exit 2 with one
`error:` line and no traceback; or, for damaged checkpoints, exit 0 with a "damaged" message), traceback (any
other exit, or "Traceback" on screen), hang (past its time limit), silent (exit 0 where a refusal was due).
The server part counts resets in a 64-request burst and refusals of a foreign Host, Origin and content type.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO / "src")}
LIMIT_S = 240
NOISE = ("Failed to load CPU gemm_4bit_forward", "Loading weights", "Writing model shards", "Warning:")


def lorafit(*argv: str, timeout: float = LIMIT_S) -> tuple[int | None, str]:
    try:
        p = subprocess.run([sys.executable, "-m", "lorafit", *argv], capture_output=True, text=True, timeout=timeout,
                           env=ENV, cwd=REPO, check=False)
        return p.returncode, p.stderr + p.stdout
    except subprocess.TimeoutExpired:
        return None, ""


def setup(root: Path) -> dict[str, Path]:
    """Tiny model, a hand-made run, a trained run with checkpoints, and every hostile file."""
    import torch
    from helpers import build_tokenizer, make_run, tiny_config
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(root / "tok")
    model = root / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), tok.eos_token_id, tok.pad_token_id)) \
        .save_pretrained(model)
    tok.save_pretrained(model)
    run = make_run(root / "tiny-run", model, template="chatml")
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(40)))
    trained = root / "trained"
    code, out = lorafit("train", "--model", str(model), "--dataset", str(data), "--output_dir", str(trained),
                        "--max_steps", "2", "--save_steps", "1", "--max_seq_length", "64", "--report_to", "none")
    assert code == 0, out
    return {"model": model, "run": run, "data": data, "trained": trained}


def files(root: Path, p: dict[str, Path]) -> None:
    w = {"deep.json": "[" * 100000 + "]" * 100000, "surrogate.jsonl": '{"instruction": "\\ud800", "output": "x"}\n',
         "hugeint.jsonl": '{"instruction": ' + "1" * 5000 + ', "output": "x"}\n',
         "nan.jsonl": '{"instruction": "a", "output": NaN}\n',
         "nul.jsonl": '{"instruction": "a\\u0000b", "output": "x"}\n',
         "quote.csv": 'instruction,output\n"What is 2+2,4\nSay hi,hello\n',
         "null.jsonl": '{"instruction": null, "output": "x"}\n',
         "cycle.jsonl": "".join(json.dumps(r) + "\n" for r in [
             {"message_id": "a", "parent_id": None, "role": "prompter", "text": "q"},
             {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "r"},
             {"message_id": "a", "parent_id": "b", "role": "prompter", "text": "q2"}]),
         "list.yaml": "- 1\n- 2\n", "flat.yaml": f"model: {p['model']}\nmax_steps: 1\n"}
    for name, text in w.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "utf16.jsonl").write_bytes('{"instruction": "a", "output": "b"}\n'.encode("utf-16"))
    (root / "random.yaml").write_bytes(os.urandom(256))
    (root / "fake.gguf").write_bytes(b"not a gguf at all")
    os.mkfifo(root / "fifo.jsonl")
    (root / "afile").write_text("x")
    shutil.copytree(p["model"], root / "model-trunc")
    (root / "model-trunc" / "model.safetensors").write_bytes((p["model"] / "model.safetensors").read_bytes()[:20000])
    for name, mutate in [("run-garbage", lambda d: (d / "config.yaml").write_bytes(os.urandom(200))),
                         ("run-list", lambda d: (d / "config.yaml").write_text("- 1\n")),
                         ("run-trunc", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 50)),
                         ("run-badcfg", lambda d: (d / "adapter_config.json").write_text('{"r": ')),
                         ("run-badcfg2",
                          lambda d: (d / "adapter_config.json").write_text('{"r": 4, "target_modules": 5}'))]:
        mutate(shutil.copytree(p["run"], root / name))
    (root / "empty").mkdir()
    (root / "link-empty").symlink_to(root / "empty")
    (root / "link-dangling").symlink_to(root / "nowhere")


def damaged_checkpoints(root: Path, trained: Path) -> Path:
    from lorafit.run_dir import write_json_atomic
    from lorafit.train.checkpoint import MANIFEST, _manifest

    run = shutil.copytree(trained, root / "damaged")
    c2, c1 = run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000001"
    (c2 / "trainer_state.json").write_text('{"step": "two", "epoch": 0}')
    (c1 / "optimizer.pt").write_bytes(b"PK\x03\x04 not torch")
    for c in (c1, c2):
        write_json_atomic(c / MANIFEST, _manifest(c))
    return run


def cli_cases(root: Path, p: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    m, r, t = str(p["model"]), str(p["run"]), str(p["trained"])
    data = [(f"data {n}", ["data", str(root / n), "--model", m], "refuse") for n in
            ("deep.json", "surrogate.jsonl", "hugeint.jsonl", "nan.jsonl", "nul.jsonl", "quote.csv", "null.jsonl",
             "cycle.jsonl", "utf16.jsonl", "fifo.jsonl")]
    train = ["train", "--model", m, "--dataset", str(p["data"]), "--max_steps", "1", "--output_dir"]
    out = str(root / "out")
    return data + [
        ("yaml random bytes", ["train", "--config", str(root / "random.yaml"), "--output_dir", out], "refuse"),
        ("yaml list", ["train", "--config", str(root / "list.yaml"), "--output_dir", out], "refuse"),
        ("config is a folder", ["train", "--config", str(root / "empty"), "--output_dir", out], "refuse"),
        ("model not gguf", ["train", "--model", str(root / "fake.gguf"), "--output_dir", out], "refuse"),
        ("model truncated", [*train[:2], str(root / "model-trunc"), *train[3:], out], "refuse"),
        ("seed -1", [*train, out, "--seed", "-1"], "refuse"),
        ("adam_beta1 1.5", [*train, out, "--adam_beta1", "1.5"], "refuse"),
        ("adam_epsilon -1", [*train, out, "--adam_epsilon", "-1"], "refuse"),
        ("output_dir is a file", [*train, str(root / "afile")], "refuse"),
        ("output_dir under /proc", [*train, "/proc/lorafit-audit"], "refuse"),
        ("run config garbage", ["eval", "--adapter_path", str(root / "run-garbage")], "refuse"),
        ("run config list", ["chat", "--adapter_path", str(root / "run-list"), "hi"], "refuse"),
        ("adapter truncated", ["chat", "--adapter_path", str(root / "run-trunc"), "hi"], "refuse"),
        ("adapter_config broken", ["chat", "--adapter_path", str(root / "run-badcfg"), "hi"], "refuse"),
        ("adapter_config types", ["chat", "--adapter_path", str(root / "run-badcfg2"), "hi"], "refuse"),
        ("serve port 99999", ["serve", "--adapter_path", r, "--port", "99999"], "refuse"),
        ("merge into link to empty", ["merge", "--adapter_path", r, "--output_dir", str(root / "link-empty")],
         "refuse"),
        ("merge into dangling link", ["merge", "--adapter_path", r, "--output_dir", str(root / "link-dangling")],
         "refuse"),
        ("resume --lora_r 4", ["train", "--output_dir", t, "--resume", "--max_steps", "3", "--lora_r", "4"], "refuse"),
        ("resume --model OTHER", ["train", "--output_dir", t, "--resume", "--max_steps", "3", "--model",
                                  str(root / "model-trunc")], "refuse"),
        ("resume --optim adamw_8bit", ["train", "--output_dir", t, "--resume", "--max_steps", "3", "--optim",
                                       "adamw_8bit"], "refuse"),
        ("damaged checkpoint content", ["train", "--output_dir", str(damaged_checkpoints(root, p["trained"])),
                                        "--resume", "--max_steps", "3"], "skip"),
        ("flat yaml model:", ["train", "--config", str(root / "flat.yaml"), "--dataset", str(p["data"]),
                              "--output_dir", str(root / "flat-out")], "accept"),
    ]


def classify(kind: str, code: int | None, out: str) -> str:
    if code is None:
        return "hang"
    if "Traceback" in out or code not in (0, 2):
        return "traceback"
    if kind == "refuse":
        return "ok" if code == 2 and "error:" in out else "silent"
    if kind == "skip":
        return "ok" if code == 0 and "is damaged" in out else "silent"
    return "ok" if code == 0 else "refused"


# -- server ---------------------------------------------------------------------------------------------------

def start_server(run: Path, log: Path):
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--adapter_path", str(run), "--port", "0",
                             "--timeout", "3"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (m := re.search(r"at http://([\d.]+):(\d+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.3)
    return proc, m.group(1), int(m.group(2))


def post(host, port, body: bytes, headers: dict, path="/v1/completions", method="POST", timeout=120):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Content-Type"), data


def server_checks(root: Path, run: Path) -> dict[str, int]:
    proc, host, port = start_server(run, root / "server.log")
    js = {"Content-Type": "application/json"}
    small = json.dumps({"prompt": "the", "max_tokens": 2}).encode()
    out: dict[str, int] = {}
    barrier, statuses = threading.Barrier(64), []

    def one():
        barrier.wait()
        try:
            statuses.append(post(host, port, small, js)[0])
        except OSError as e:
            statuses.append(type(e).__name__)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    out["burst_64_resets"] = sum(s != 200 for s in statuses)
    foreign = [({**js, "Host": "evil.example"}, 403), ({**js, "Origin": "http://evil.example"}, 403),
               ({"Content-Type": "text/plain"}, 415)]
    out["foreign_refused"] = sum(post(host, port, small, h)[0] == want for h, want in foreign)
    out["foreign_tried"] = len(foreign)
    bad = [b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages": ' + b"[" * 50000 + b"}"]
    out["malformed_500"] = sum(post(host, port, b, js, "/v1/chat/completions")[0] >= 500 for b in bad)
    out["put_options_not_json"] = sum(post(host, port, b"{}", js, method=mth)[1] != "application/json"
                                      for mth in ("PUT", "OPTIONS"))
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: -1\r\n\r\n")
        answered = s.recv(100).startswith(b"HTTP/1.1 400")
    out["content_length_minus1_hang"] = int(not answered or time.monotonic() - t0 > 10)
    half = socket.create_connection((host, port), timeout=30)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\n\r\n{")
    t0 = time.monotonic()
    proc.terminate()
    try:
        proc.wait(30)
        out["sigterm_hang"] = 0
    except subprocess.TimeoutExpired:
        proc.kill()
        out["sigterm_hang"] = 1
    out["sigterm_seconds"] = round(time.monotonic() - t0, 1)
    half.close()
    out["server_tracebacks"] = (root / "server.log").read_text().count("Traceback")
    return out


def main() -> None:
    out_dir = Path(os.environ.get("OUT", tempfile.gettempdir()))
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="audit18-"))
    p = setup(root)
    files(root, p)
    cases = cli_cases(root, p)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: (c, *lorafit(*c[1])), cases))
    counts = {"ok": 0, "traceback": 0, "hang": 0, "silent": 0, "refused": 0, "library_noise": 0}
    with open(out_dir / "audit18.jsonl", "w", encoding="utf-8") as f:
        for (name, _, kind), code, text in results:
            verdict = classify(kind, code, text)
            counts[verdict] += 1
            counts["library_noise"] += any(n in text for n in NOISE)
            last = [ln for ln in text.splitlines() if ln.startswith(("error:", "checkpoint"))][:2]
            f.write(json.dumps({"case": name, "kind": kind, "exit": code, "verdict": verdict, "said": last}) + "\n")
            print(f"{verdict:10} {name:30} exit {code}  {' | '.join(last)[:150]}")
        server = server_checks(root, p["run"])
        f.write(json.dumps({"server": server}) + "\n")
    print(f"\nCLI cases {len(cases)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("server: " + ", ".join(f"{k} {v}" for k, v in server.items()))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

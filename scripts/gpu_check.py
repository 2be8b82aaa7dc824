"""The GPU check, for a lent GPU machine (the device tool runs it from the repository root; it needs no data set).

    python3 scripts/gpu_check.py --out $OUT                   # on the GPU: about 10 minutes
    OMP_NUM_THREADS=2 python scripts/gpu_check.py --out /tmp/gpu --tiny --device cpu   # the same path at tiny size

1. CUDA and bf16: the teacher's KV-cache sampler equals its full forward on the device; a bf16-autocast forward stays
   within 2% of float32 in logits; a tokenizer and a teacher train two steps with ``--amp``.
2. The bench's DD2 (the paper's recipe) at 100x its CPU budget: the bench runs CSD for 250 generator steps at batch
   32; this runs 3125 at batch 256 with the ``paper`` preset's LR schedule, after stage 1 at 8x the bench's pool and
   10x its steps. There is no data set on the GPU machine (the repository already fills most of what a call may
   carry), so stage 0 fine-tunes on 20,000 images the shipped teacher samples (a folder data set, one sub-folder per
   class): the continuous-input teacher learns the teacher's own distribution, which is what stage 0 is for.
3. ``benchmarks/published_shapes.py --device cuda --bf16``: speed at LlamaGen-B's and VAR-d16's shapes (if present).

Writes OUT/gpu-check.json (every figure, the device, the commands) and OUT/dd2-export.tar.gz: the DD2 generator with
its stage-0 teacher and tokenizer (``onestep export --half``), to be evaluated where the data set is
(``tar xzf dd2-export.tar.gz; onestep eval --run dd2-export -n 10000``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "fashion-mnist" / "teacher"
FULL = {"images": 20000, "adapt": ["--preset", "small"], "tune": ["--preset", "small", "--steps", "4000",
        "--n-pool", "32768", "--batch-size", "256"], "train": ["--preset", "paper", "--steps", "3125",
        "--batch-size", "256"]}
TINY = {"images": 200, "adapt": ["--preset", "tiny"], "tune": ["--preset", "tiny"], "train": ["--preset", "tiny"]}


def onestep(*args: str, env_device: str) -> float:
    """Run one onestep command on the device; its wall seconds."""
    cmd = [sys.executable, "-m", "onestep", *args, "--device", env_device]
    print("+", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return round(time.time() - t0, 1)


def check_cuda(device: str, out: Path) -> dict:
    """KV cache against the full forward, bf16 against float32, two --amp training steps of a tokenizer and teacher."""
    import torch

    from onestep.teacher.load import load_teacher
    from onestep.teacher.sampling import SamplingConfig, sample_tokens

    res = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    teacher, _, _ = load_teacher(TEACHER, device)
    labels = torch.arange(16, device=device) % teacher.num_classes
    rule = SamplingConfig(cfg_scale=2.0)
    a = sample_tokens(teacher, labels, rule, torch.Generator(device=device).manual_seed(0), use_cache=True)
    b = sample_tokens(teacher, labels, rule, torch.Generator(device=device).manual_seed(0), use_cache=False)
    res["kv_cache_equals_full_forward"] = float((a == b).float().mean())
    with torch.no_grad():
        ref = teacher(a, labels).float()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu")
        with ctx:
            low = teacher(a, labels).float()
    res["bf16_logit_rel_error"] = float((low - ref).norm() / ref.norm())
    res["amp_tokenizer_teacher_s"] = [
        onestep("train-tokenizer", "--preset", "tiny", "--run-dir", str(out / "amp-tok"), "--steps", "2", "--data",
                "folder", "--data-root", str(out / "images"), env_device=device),
        onestep("train-teacher", "--preset", "tiny", "--tokenizer", str(out / "amp-tok"), "--run-dir",
                str(out / "amp-teacher"), "--steps", "2", "--amp", env_device=device)]
    return res


def teacher_images(n: int, device: str, folder: Path) -> float:
    """``n`` images of the shipped teacher (CFG 2.0), balanced over classes, as ROOT/<class>/<i>.png."""
    import torch
    from PIL import Image

    import onestep

    t0 = time.time()
    gen = onestep.load(TEACHER, device=device)
    labels = [i % gen.num_classes for i in range(n)]
    images = gen.sample(labels, seed=123, batch_size=1000 if device.startswith("cuda") else 100)
    for c in range(gen.num_classes):
        (folder / f"{c:02d}").mkdir(parents=True, exist_ok=True)
    for i, (img, c) in enumerate(zip(images, labels)):
        Image.fromarray(img[0].numpy()).save(folder / f"{c:02d}" / f"{i:06d}.png")
    return round(time.time() - t0, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where the runs and gpu-check.json go")
    ap.add_argument("--device", default="cuda", help="the device (default: cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny presets: the same path in a few minutes on a CPU")
    ap.add_argument("--skip-shapes", action="store_true", help="do not run benchmarks/published_shapes.py")
    a = ap.parse_args(argv)
    out = Path(a.out)
    runs = Path("/tmp/onestep-gpu-check") if not a.tiny else out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    plan = TINY if a.tiny else FULL
    res: dict = {"device": a.device, "tiny": a.tiny, "plan": plan}
    res["teacher_images_s"] = teacher_images(plan["images"], a.device, runs / "images")
    res["cuda"] = check_cuda(a.device, runs)
    data = ["--data", "folder", "--data-root", str(runs / "images")]
    res["dd2_s"] = {
        "adapt": onestep("dd2", "adapt", "--teacher", str(TEACHER), "--run-dir", str(runs / "adapt"), *data,
                         *plan["adapt"], env_device=a.device),
        "tune": onestep("dd2", "tune", "--teacher", str(runs / "adapt"), "--run-dir", str(runs / "tune"),
                        "--cfg-scale", "2.0", *plan["tune"], env_device=a.device),
        "train": onestep("dd2", "train", "--tune", str(runs / "tune"), "--run-dir", str(runs / "dd2"),
                         *plan["train"], env_device=a.device)}
    res["adapt_metrics"] = json.loads((runs / "adapt" / "metrics.json").read_text())
    res["train_metrics"] = json.loads((runs / "dd2" / "metrics.json").read_text())
    # the generator with its stage-0 teacher and tokenizer as one export (float16), packed into one file: what comes
    # back from the GPU machine is at most 16 MiB a file and two folders deep
    export = runs / "dd2-export"
    shutil.rmtree(export, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onestep", "export", str(runs / "dd2"), str(export), "--half"], check=True,
                   cwd=ROOT)
    shutil.make_archive(str(out / "dd2-export"), "gztar", root_dir=runs, base_dir="dd2-export")
    if not a.skip_shapes and (ROOT / "benchmarks" / "published_shapes.py").exists():
        cmd = [sys.executable, "benchmarks/published_shapes.py", "--device", a.device,
               *(["--bf16"] if a.device.startswith("cuda") else []), "--out", str(out / "published-shapes")]
        if a.tiny:
            cmd += ["--shapes", "llamagen-tiny", "var-tiny", "--repeats", "1", "1", "--teacher-repeats", "1", "1"]
        subprocess.run(cmd, check=True, cwd=ROOT)
    (out / "gpu-check.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

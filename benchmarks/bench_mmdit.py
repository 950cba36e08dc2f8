"""Training-step throughput of our MMDiT against diffusers' SD3Transformer2DModel.

One step = forward, velocity MSE, backward, AdamW update, both models at the identical
config, weights and precision. Steps of the two models are interleaved in rounds so that
load from other processes hits both alike; the median round is reported.

  CPU (issue 3):  python benchmarks/bench_mmdit.py
  Demo's model:   python benchmarks/bench_mmdit.py --demo --settings eager-fp32 eager-bf16
  GPU:            python benchmarks/bench_mmdit.py --gpu   (bf16, d = 24, 256^2, MFU)
  Profile:        python benchmarks/bench_mmdit.py --profile --settings eager-fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from model.convert import to_diffusers_key
from model.flops import mmdit_flops
from model.mmdit import MMDiT, MMDiTConfig

SETTINGS = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


@dataclass
class Workload:
    config: MMDiTConfig
    batch: int
    latent_side: int
    text_tokens: int
    device: str


def cpu_workload() -> Workload:
    # d = 4 (hidden 256, 4 heads of 64), 32 x 32 latents, 154 x 4096 text, batch 8.
    return Workload(MMDiTConfig.from_preset("d4"), 8, 32, 154, "cpu")


def demo_workload() -> Workload:
    # The demo's MMDiT (configs/train_demo.toml): hidden 128 (4 heads of 32), 4 blocks,
    # 16 x 16 latents, 24 + 24 text tokens of width 64, batch 16.
    config = MMDiTConfig.from_preset(
        "tiny", num_layers=4, num_attention_heads=4, attention_head_dim=32,
        caption_projection_dim=128, joint_attention_dim=64, pooled_projection_dim=64,
        sample_size=16, pos_embed_max_size=16)
    return Workload(config, 16, 16, 48, "cpu")


def gpu_workload(batch: int) -> Workload:
    return Workload(MMDiTConfig.from_preset("d24"), batch, 32, 154, "cuda")  # 256^2 images


MODEL_NAMES = ("ours", "diffusers")


def build_models(work: Workload, names=MODEL_NAMES) -> dict[str, torch.nn.Module]:
    """The named models with identical random weights (all parameters, adaLN included)."""
    torch.manual_seed(0)
    ours = MMDiT(work.config)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0, 0.02)
    models = {"ours": ours}
    if "diffusers" in names:
        theirs = SD3Transformer2DModel(**work.config.to_dict())
        state = {to_diffusers_key(k): v for k, v in ours.state_dict().items()}
        missing = theirs.load_state_dict(state, strict=False).missing_keys
        assert all("add_q_proj" in k or "norm_added_q" in k for k in missing), missing
        models["diffusers"] = theirs
    return {name: models[name].to(work.device) for name in names}


def make_batch(work: Workload) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    side, cfg, b = work.latent_side, work.config, work.batch
    batch = {
        "x": torch.randn(b, cfg.in_channels, side, side, generator=g),
        "t": torch.rand(b, generator=g),
        "context": torch.randn(b, work.text_tokens, cfg.joint_attention_dim, generator=g),
        "pooled": torch.randn(b, cfg.pooled_projection_dim, generator=g),
        "target": torch.randn(b, cfg.out_channels, side, side, generator=g),
    }
    return {k: v.to(work.device) for k, v in batch.items()}


def velocity(name: str, model, batch):
    if name == "ours":
        return model(batch["x"], batch["t"], batch["context"], batch["pooled"])
    return model(batch["x"], batch["context"], batch["pooled"], batch["t"] * 1000, return_dict=False)[0]


def make_step(name: str, model, batch, bf16: bool, compiled: bool):
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # same optimizer for both
    device_type = batch["x"].device.type

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            prediction = velocity(name, forward, batch)
        loss = F.mse_loss(prediction.float(), batch["target"])
        loss.backward()
        optimizer.step()
        return loss.item()  # also synchronises the device

    return step


def time_steps(step, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def run_setting(work: Workload, setting: str, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per step of each model. On CPU the two models alternate round by round
    (the machine is shared); on a GPU they run one after the other, each alone in memory."""
    compiled, bf16 = setting.startswith("compiled"), setting.endswith("bf16")
    batch = make_batch(work)
    groups = [MODEL_NAMES] if work.device == "cpu" else [(name,) for name in MODEL_NAMES]
    times: dict[str, list[float]] = {}
    for names in groups:
        models = build_models(work, names)
        steps_by_name = {name: make_step(name, m, batch, bf16, compiled) for name, m in models.items()}
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(warmup):
                step()
            print(f"  {setting} {name}: warm-up {time.perf_counter() - start:.1f}s", flush=True)
            times[name] = []
        for _ in range(rounds):
            for name, step in steps_by_name.items():
                times[name].append(time_steps(step, steps))
        del models, steps_by_name
        if work.device == "cuda":
            torch.cuda.empty_cache()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"setting": setting, **medians, "speedup": medians["diffusers"] / medians["ours"]}


def output_agreement(work: Workload) -> dict[str, float]:
    """Relative error of each model's bf16-autocast output against our fp32 output."""
    models, batch = build_models(work), make_batch(work)
    with torch.no_grad():
        reference = velocity("ours", models["ours"], batch).float()
        errors = {}
        for name, model in models.items():
            with torch.autocast(batch["x"].device.type, dtype=torch.bfloat16):
                out = velocity(name, model, batch).float()
            errors[name] = ((out - reference).norm() / reference.norm()).item()
    return errors


def profile_setting(work: Workload, setting: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    compiled, bf16 = setting.startswith("compiled"), setting.endswith("bf16")
    batch = make_batch(work)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if work.device == "cuda" else [])
    for name in MODEL_NAMES:  # one model in memory at a time
        step = make_step(name, build_models(work, (name,))[name], batch, bf16, compiled)
        step(), step()
        with profile(activities=activities) as prof:
            step()
        sort = "self_cuda_time_total" if work.device == "cuda" else "self_cpu_time_total"
        print(f"=== {name} {setting}\n{prof.key_averages().table(sort_by=sort, row_limit=18)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="bf16, d = 24, 256^2 on CUDA; MFU")
    parser.add_argument("--demo", action="store_true", help="the demo's tiny MMDiT on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (CPU) / 32 (GPU)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=None, help="override the GPU peak")
    args = parser.parse_args(argv)

    work = (gpu_workload(args.batch or 32) if args.gpu
            else demo_workload() if args.demo else cpu_workload())
    if args.batch and not args.gpu:
        work.batch = args.batch
    settings = args.settings or (["eager-bf16", "compiled-bf16"] if args.gpu else list(SETTINGS))
    torch.backends.cuda.matmul.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if args.gpu else "cpu"
    print(f"device {device_name}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"layers {work.config.num_layers}, hidden {work.config.hidden_size}, batch {work.batch}")
    if args.profile:
        for setting in settings:
            profile_setting(work, setting)
        return 0
    print("bf16 autocast output vs our fp32 output (relative error):", output_agreement(work))
    flops = mmdit_flops(work.config, work.latent_side, work.latent_side, work.text_tokens)
    peak = args.peak_flops or next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    print(f"{'setting':<15}{'ours s/step':>12}{'diffusers':>12}{'speedup':>9}{'ours TFLOP/s':>14}")
    for setting in settings:
        r = run_setting(work, setting, args.rounds, args.steps, args.warmup)
        achieved = flops.training_step * work.batch / r["ours"]
        mfu = f"  MFU {achieved / peak:.1%}" if peak and args.gpu else ""
        print(f"{setting:<15}{r['ours']:>12.3f}{r['diffusers']:>12.3f}{r['speedup']:>8.2f}x"
              f"{achieved / 1e12:>14.3f}{mfu}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The reference trainer ``sft``: full fine-tuning and pre-training from scratch.

One loop for both: a model folder with weights is fine-tuned; a config.json
(or a folder with no weights) is built with fresh weights and pre-trained.
AdamW with linear warmup and cosine decay, gradient accumulation and
clipping, fp32 or bf16 autocast, gradient checkpointing on any layers,
periodic validation loss, atomic checkpoints that ``resume`` continues
exactly (same data order, optimizer state and step), and a final model in
Hugging Face format.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from enigma.datasets import DataOptions, load_blocks
from enigma.dtypes import torch_dtype
from enigma.errors import ConfigError, NotFoundError
from enigma.fsutil import atomic_write_text
from enigma.loader import load_model, read_hf_config
from enigma.models import architecture_class
from enigma.saving import save_model_folder
from enigma.tokenizer import Tokenizer
from enigma.training.attention import causal_lm_loss
from enigma.training.checkpoint import checkpoints_dir, latest_checkpoint
from enigma.training.config import TrainConfig
from enigma.training.distribution import SingleProcess
from enigma.training.progress import ProgressCallback, TrainProgress

RUN_RECORD = "enigma_training.json"


def build_model(source: str, *, seed: int) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The model to train, its config.json, and the folder it came from.

    A folder with safetensors weights is loaded; a config.json file, or a folder
    whose config.json has no weights beside it, gives freshly initialized weights.
    """
    path = Path(source).expanduser()
    if path.is_file():
        try:
            hf_config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config {path} is not valid JSON ({exc})") from exc
        folder = path.parent
    elif path.is_dir():
        if any(path.glob("*.safetensors")):
            loaded = load_model(path, dtype=torch.float32)
            return loaded.model.train(), loaded.hf_config, path
        hf_config, folder = read_hf_config(path), path
    else:
        raise NotFoundError(f"model {source!r} not found: pass a model folder to fine-tune, or a config.json "
                            "to train from scratch")
    architecture, cls = architecture_class(hf_config, source=str(path))
    if not hasattr(cls, "checkpoint_tensors"):
        raise ConfigError(f"the sft trainer trains causal language models; {architecture} is not one")
    torch.manual_seed(seed)
    model = cls.from_hf_config(hf_config)
    init_weights(model, std=float(hf_config.get("initializer_range", 0.02)))
    return model.train(), hf_config, folder


def init_weights(model: torch.nn.Module, *, std: float) -> None:
    """Transformers' initialization for Llama-style models: N(0, std) for linear
    and embedding weights, zero biases, unit norms."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=False, foreach=True)


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, if any."""
    if not tokenizer.chat_template:
        return None
    marker = "\x00enigma-end-of-turn\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": marker}], add_generation_prompt=False)
    after = text.partition(marker)[2]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    return next((token for token in ids if token in tokenizer.all_special_ids), None)


def generation_config_for(tokenizer: Tokenizer, hf_config: dict[str, Any], *,
                          base_folder: Path | None = None) -> dict[str, Any]:
    """generation_config.json: BOS, and every id that ends generation (EOS and end of turn)."""
    eos = list(tokenizer.eos_token_ids)
    if not eos and isinstance(hf_config.get("eos_token_id"), int):
        eos = [hf_config["eos_token_id"]]
    turn_end = end_of_turn_id(tokenizer)
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    config: dict[str, Any] = {"_from_model_config": False}
    base = base_folder / "generation_config.json" if base_folder is not None else None
    if base is not None and base.is_file():  # fine-tuning keeps the base model's sampling recommendations
        with contextlib.suppress(ValueError):
            config.update({k: v for k, v in json.loads(base.read_text(encoding="utf-8")).items()
                           if k not in ("eos_token_id", "bos_token_id")})
    if tokenizer.bos_token_id is not None:
        config["bos_token_id"] = tokenizer.bos_token_id
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


@attrs.frozen
class StepLoss:
    """One micro-batch's loss and what the loop reports about it."""

    loss: torch.Tensor
    """The mean loss to back-propagate."""
    weight: int
    """What the loss is a mean over (target tokens, pairs): validation averages by it."""
    tokens: int
    """Tokens the forward pass processed (for tokens/s)."""
    metrics: dict[str, float] = attrs.field(factory=dict)
    """Further numbers to log (``rewards/margins``), averaged over the logging window."""


class SFTTrainer:
    """Supervised training of a causal LM on text, instruction or chat data.

    A trainer plugin can subclass it and change what trains by overriding
    :meth:`prepare_model` (freeze parts, wrap Linears with adapters) and what
    it writes by overriding :meth:`save_result`; the optimizer and the
    checkpoints take the parameters that still require gradients.

    :attr:`distribution` says where the work happens: this process alone
    (the default), or one rank of a data-parallel or ZeRO job, which
    ``enigma-plugin-zero`` sets before calling :meth:`train`.
    """

    distribution = SingleProcess()

    def build(self, config: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any], Path]:
        """The model to start from (loaded in float32, or freshly initialized), its config.json and
        folder; a trainer that holds the base differently (QLoRA's 4-bit) loads it its own way."""
        return build_model(config.model, seed=config.seed)

    def prepare_model(self, model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
        """The model to train, given the one built or loaded (before the optimizer and any resume)."""
        return model

    def load_data(self, config: TrainConfig, tokenizer: Tokenizer, model: torch.nn.Module) -> Any:
        """The training data: an object with ``batches_per_epoch(batch_size)``, ``train_batches(batch_size,
        seed=, start=)`` (endless, resumable at batch ``start``) and ``val_batches(batch_size)``; here
        token blocks of text, instruction or chat records. Called after :meth:`prepare_model`, before
        any checkpoint is restored (so ``model`` is the starting model)."""
        options = DataOptions(seq_len=config.seq_len, packing=config.packing, format=config.format,
                              val_fraction=config.val_fraction)
        return load_blocks(config.data, tokenizer, options, streaming=config.streaming,
                           shuffle_buffer=config.shuffle_buffer)

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> StepLoss:
        """The loss of one batch from :meth:`load_data`: here next-token cross-entropy over its targets."""
        input_ids, labels = batch
        loss, targets = causal_lm_loss(model, input_ids, labels)
        return StepLoss(loss, targets, int(input_ids[:, :-1].numel()))

    def save_result(self, model: torch.nn.Module, hf_config: dict[str, Any], out: Path, *, tokenizer_folder: Path,
                    dtype: torch.dtype | None, generation_config: dict[str, Any]) -> None:
        """Write what training made into ``out``: here the whole model as a Hugging Face folder; an adapter
        trainer writes its adapter instead."""
        save_model_folder(model, hf_config, out, tokenizer_folder=tokenizer_folder, dtype=dtype,
                          generation_config=generation_config)

    def train(self, config: TrainConfig, *, progress: ProgressCallback | None = None) -> Path:
        dist = self.distribution
        report = (progress or (lambda event: None)) if dist.is_main else (lambda event: None)
        if config.threads:
            torch.set_num_threads(config.threads)
        out = Path(config.out).expanduser()
        checkpoint = latest_checkpoint(out)
        if config.resume and checkpoint is None:
            raise NotFoundError(f"nothing to resume: {checkpoints_dir(out)} holds no checkpoint; "
                                "run without --resume to start")
        if not config.resume and checkpoints_dir(out).exists() and any(checkpoints_dir(out).iterdir()):
            raise ConfigError(f"{out} already holds a run's checkpoints; pass --resume to continue it, "
                              "or choose another --out")

        model, hf_config, model_folder = self.build(config)
        tokenizer_folder = Path(config.tokenizer).expanduser() if config.tokenizer else model_folder
        tokenizer = Tokenizer(tokenizer_folder)
        vocab = hf_config.get("vocab_size", 0)
        if tokenizer.vocab_size > vocab:
            raise ConfigError(f"the tokenizer in {tokenizer_folder} has {tokenizer.vocab_size} tokens but the "
                              f"model's vocab_size is {vocab}; use the model's tokenizer or raise vocab_size")
        model.checkpointed_layers = config.checkpointed_layers(model.num_layers)
        torch.manual_seed(config.seed)  # what prepare_model initializes (adapters) is the same every run, every rank
        model = self.prepare_model(model, config)

        data = self.load_data(config, tokenizer, model)
        micro_batches_per_step = config.grad_accum * dist.world_size
        total_steps = config.max_steps or max(1, math.ceil(
            config.epochs * data.batches_per_epoch(config.batch_size) / micro_batches_per_step))

        model = dist.shard_model(model)
        optimizer = dist.make_optimizer(model, lambda module: make_optimizer(module, config))
        warmup = min(config.warmup_steps, total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, warmup=warmup, total=total_steps, min_ratio=config.min_lr_ratio))
        step = 0
        if config.resume:
            assert checkpoint is not None
            state = dist.load_checkpoint(checkpoint, model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step = int(state["step"])
            report(TrainProgress(event="start", step=step, total_steps=total_steps,
                                 message=f"resuming from {checkpoint}"))
        else:
            parameters = list(dict.fromkeys(model.parameters()))
            total, trained = sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)
            report(TrainProgress(event="start", step=0, total_steps=total_steps,
                                 message=f"{total:,} parameters" if trained == total else
                                 f"{trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)"))

        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.dtype == "bf16"
                    else contextlib.nullcontext())
        batches = dist.micro_batches(data.train_batches(config.batch_size, seed=config.seed,
                                                        start=step * micro_batches_per_step))
        window_loss, window_steps, window_start, window_tokens = 0.0, 0, time.perf_counter(), 0
        window_metrics: dict[str, float] = {}
        total_tokens = 0
        run_start, steps_this_run = time.perf_counter(), 0
        val_loss = None
        while step < total_steps:
            for micro in range(config.grad_accum):
                dist.sync_gradients(model, micro == config.grad_accum - 1)
                with autocast:
                    result = self.compute_loss(model, next(batches))
                (result.loss / config.grad_accum).backward()
                window_loss += result.loss.item() / config.grad_accum
                window_tokens += result.tokens
                for name, value in result.metrics.items():
                    window_metrics[name] = window_metrics.get(name, 0.0) + value / config.grad_accum
            if config.grad_clip:
                dist.clip_grad_norm(model, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            window_steps += 1
            if step % config.log_interval == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                per_step = (time.perf_counter() - run_start) / steps_this_run
                names = sorted(window_metrics)
                window_loss, *averaged = dist.mean([window_loss, *(window_metrics[name] for name in names)])
                window_tokens = round(dist.total(window_tokens))
                report(TrainProgress(event="step", step=step, total_steps=total_steps,
                                     loss=window_loss / window_steps, lr=scheduler.get_last_lr()[0],
                                     tokens_per_s=window_tokens / elapsed, eta_s=per_step * (total_steps - step),
                                     metrics={name: value / window_steps for name, value in zip(names, averaged)}))
                total_tokens += window_tokens
                window_loss, window_steps, window_start, window_tokens = 0.0, 0, time.perf_counter(), 0
                window_metrics = {}
            if step % config.eval_interval == 0 or step == total_steps:
                val_loss = self.evaluate(model, data, config, autocast)
                if val_loss is not None:
                    report(TrainProgress(event="eval", step=step, total_steps=total_steps, val_loss=val_loss))
            if step % config.save_interval == 0 and step < total_steps:
                state = {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step}
                path = dist.save_checkpoint(out, step, model, optimizer, state, keep=config.keep_checkpoints)
                report(TrainProgress(event="save", step=step, total_steps=total_steps, path=str(path)))

        optimizer_bytes, peak_bytes = dist.optimizer_state_bytes(optimizer), dist.peak_memory_bytes()
        final = dist.final_model(model, lambda: self.prepare_model(self.build(config)[0], config))
        if final is not None:
            save_dtype = None if config.save_dtype == "auto" else torch_dtype(config.save_dtype)
            self.save_result(final, hf_config, out, tokenizer_folder=tokenizer_folder, dtype=save_dtype,
                             generation_config=generation_config_for(tokenizer, hf_config, base_folder=model_folder))
            tokens = round(total_tokens / max(steps_this_run, 1) * step)  # a resumed run: at this run's rate
            record = {"config": config.to_dict(), "steps": step, "tokens": tokens, "distribution": dist.name,
                      "world_size": dist.world_size, "optimizer_state_bytes_per_rank": optimizer_bytes,
                      "peak_rss_bytes_per_rank": peak_bytes,
                      "val_loss": val_loss, "val_perplexity": None if val_loss is None else math.exp(val_loss)}
            atomic_write_text(out / RUN_RECORD, json.dumps(record, indent=2) + "\n")
        dist.barrier()
        report(TrainProgress(event="done", step=step, total_steps=total_steps, val_loss=val_loss, path=str(out)))
        return out

    def evaluate(self, model: torch.nn.Module, data: Any, config: TrainConfig, autocast: Any) -> float | None:
        """Mean validation loss (per target token, per pair: per :attr:`StepLoss.weight`) over up to
        ``eval_batches`` batches."""
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for index, batch in enumerate(data.val_batches(config.batch_size)):
                if index >= config.eval_batches:
                    break
                result = self.compute_loss(model, batch)
                total += result.loss.item() * result.weight
                count += result.weight
        return total / count if count else None

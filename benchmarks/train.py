"""Training speed and activation memory: enigma's sft trainer vs a plain transformers loop.

    python benchmarks/train.py            # --threads 2 --steps 8 --seq-len 256 --batch-size 8

Same model (a random Llama, same initial weights), same batches, same AdamW
settings, in the same run. Reports steady-state training tokens/s of each
(interleaved, best of repeats), and for enigma with and without gradient
checkpointing on every layer: the bytes autograd keeps for the backward pass
(counted exactly through saved-tensor hooks) and the time per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192, "hidden_size": 512,
    "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "eos_token_id": 0,
    "bos_token_id": None, "initializer_range": 0.02,
}


def make_inputs(work: Path, seq_len: int, batch_size: int, steps: int):
    """A corpus, a tokenizer trained on it, the model config, and the batches both loops see."""
    from tiny_models import CORPUS

    from enigma.datasets import DataOptions, load_blocks
    from enigma.tokenizer import Tokenizer
    from enigma.training.tokenizer import train_tokenizer

    words = " ".join(CORPUS.split())
    lines = [f"{i}: {words[(i * 37) % 400:] } {words[: (i * 53) % 500]}" for i in range(4000)]
    (work / "corpus.txt").write_text("\n".join(lines))
    train_tokenizer([work / "corpus.txt"], work / "tok", vocab_size=2048)
    (work / "config.json").write_text(json.dumps(MODEL))
    tokenizer = Tokenizer(work / "tok")
    blocks = load_blocks([work / "corpus.txt"], tokenizer, DataOptions(seq_len=seq_len, val_fraction=0.0))
    stream = blocks.train_batches(batch_size, seed=0)
    return [next(stream) for _ in range(steps)]


def enigma_model():
    from enigma.training.sft import build_model

    model, _, _ = build_model(str(WORK / "config.json"), seed=0)
    return model


def transformers_model(state_from):
    import transformers

    from enigma.saving import save_model_folder

    folder = WORK / "hf-init"
    save_model_folder(state_from, MODEL, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).train()


def optimizer_for(model):
    decay = [p for p in dict.fromkeys(model.parameters()) if p.dim() >= 2]
    rest = [p for p in dict.fromkeys(model.parameters()) if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=3e-4, betas=(0.9, 0.95), foreach=True)


def enigma_step(model, optimizer, batch):
    from enigma.training.attention import causal_lm_loss

    loss, _ = causal_lm_loss(model, *batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def transformers_step(model, optimizer, batch):
    input_ids, labels = batch
    logits = model(input_ids=input_ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def tokens_per_s(step, model, optimizer, batches, warmup=2):
    for batch in batches[:warmup]:
        step(model, optimizer, batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(model, optimizer, batch)
    elapsed = time.perf_counter() - start
    return sum(b[0].shape[0] * (b[0].shape[1] - 1) for b in batches[warmup:]) / elapsed


def saved_activation_bytes(model, batch):
    """Bytes autograd holds for backward after one forward (each storage counted once)."""
    from enigma.training.attention import causal_lm_loss

    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = causal_lm_loss(model, *batch)
    held = sum(storages.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return held


def main() -> None:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    WORK = Path(tempfile.mkdtemp(prefix="enigma-train-bench-"))
    batches = make_inputs(WORK, args.seq_len, args.batch_size, args.steps)

    ours = enigma_model()
    theirs = transformers_model(ours)
    params = sum(p.numel() for p in dict.fromkeys(ours.parameters()))
    print(f"model: random Llama, {params / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len} tokens; "
          f"{args.threads} threads; {args.steps} steps (2 warm-up)")
    # the same first step from the same weights: the two loops compute the same loss
    first_ours = enigma_step(enigma_model(), optimizer_for(ours), batches[0])
    first_theirs = transformers_step(transformers_model(ours), optimizer_for(theirs), batches[0])
    print(f"first-step loss: enigma {first_ours:.5f}, transformers {first_theirs:.5f}")

    half = frozenset(range(0, MODEL["num_hidden_layers"], 2))
    results: dict[str, float] = {"enigma": 0.0, "transformers": 0.0, "enigma+ckpt": 0.0, "enigma+half": 0.0}
    for _ in range(args.repeats):
        model = enigma_model()
        results["enigma"] = max(results["enigma"], tokens_per_s(enigma_step, model, optimizer_for(model), batches))
        model = transformers_model(ours)
        results["transformers"] = max(results["transformers"],
                                      tokens_per_s(transformers_step, model, optimizer_for(model), batches))
        model = enigma_model()
        model.checkpointed_layers = frozenset(range(model.num_layers))
        results["enigma+ckpt"] = max(results["enigma+ckpt"],
                                     tokens_per_s(enigma_step, model, optimizer_for(model), batches))
        model = enigma_model()
        model.checkpointed_layers = half
        results["enigma+half"] = max(results["enigma+half"],
                                     tokens_per_s(enigma_step, model, optimizer_for(model), batches))
    print(f"training tokens/s: enigma {results['enigma']:.0f}, transformers {results['transformers']:.0f} "
          f"-> ratio {results['enigma'] / results['transformers']:.2f}x")

    model = enigma_model()
    plain = saved_activation_bytes(model, batches[0])
    model.checkpointed_layers = frozenset(range(model.num_layers))
    checkpointed = saved_activation_bytes(model, batches[0])
    model.checkpointed_layers = half
    halfway = saved_activation_bytes(model, batches[0])
    print(f"activation memory kept for backward: {plain / 2**20:.0f} MiB without checkpointing")
    for label, held, key in (("every layer", checkpointed, "enigma+ckpt"), ("every other layer", halfway,
                                                                             "enigma+half")):
        print(f"  {label} checkpointed: {held / 2**20:.0f} MiB ({100 * (1 - held / plain):.0f}% less), "
              f"{100 * (results['enigma'] / results[key] - 1):.0f}% more time per step ({results[key]:.0f} tok/s)")


WORK = Path()

if __name__ == "__main__":
    main()

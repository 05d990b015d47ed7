"""``LLM``: the offline Python API, shaped like vLLM's.

>>> from enigma import LLM, SamplingParams
>>> llm = LLM("path/to/hf-folder")
>>> outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
>>> outs[0].outputs[0].text

Requests run one after another through the model runner's paged KV cache.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any

import torch

from enigma.errors import BadRequestError, NotFoundError
from enigma.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from enigma.sampling import SamplingParams, sample, top_logprobs
from enigma.sequence import Sequence

Prompt = str | list[int]
Message = dict[str, Any]


def resolve_model_path(model: str | Path) -> Path:
    """A model folder for ``model`` (a path to a Hugging Face folder)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    raise NotFoundError(f"model {str(model)!r} not found: no folder at {path.resolve()}; pass the path of a "
                        "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")


class LLM:
    """A model loaded for offline generation or embedding."""

    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "auto", backend: str = "auto",
                 device: str | None = None, block_size: int = 16) -> None:
        from enigma.loader import load_model
        from enigma.plugins import get_host
        from enigma.tokenizer import Tokenizer

        folder = resolve_model_path(model)
        self.backend = get_host().create("backend", backend, device=device)
        self.loaded = load_model(folder, dtype=dtype, device=self.backend.device)
        self.tokenizer = Tokenizer(folder)
        self.model_name = str(model)
        self._ids = itertools.count()
        self._runner = None
        self._pooling = None
        if self.loaded.is_embedding_model:
            from enigma.embedding import read_max_seq_length, read_pooling

            self.model = self.backend.prepare(self.loaded.model, dtype=self.loaded.dtype)
            self._pooling = read_pooling(folder)
            self.max_model_len = read_max_seq_length(folder, self.loaded.hf_config)
        else:
            from enigma.runner import ModelRunner

            self._runner = ModelRunner(self.loaded, self.backend, block_size=block_size)
            self.max_model_len = self._runner.max_model_len
        self.eos_token_ids = self.tokenizer.eos_token_ids

    # ------------------------------------------------------------ generation

    def generate(self, prompts: Prompt | SequenceOf[Prompt],
                 sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); one :class:`RequestOutput` per prompt, in order."""
        self._require_generator("generate")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_for(len(prompts), sampling_params)
        outputs = []
        for prompt, params in zip(prompts, params_list):
            if isinstance(prompt, str):
                text, token_ids = prompt, self.tokenizer.encode(prompt)
            else:
                text, token_ids = None, self._check_token_ids(prompt)
            outputs.append(self._generate_one(str(next(self._ids)), text, token_ids, params))
        return outputs

    def chat(self, messages: list[Message] | SequenceOf[list[Message]],
             sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several, through the chat template."""
        self._require_generator("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = self._params_for(len(conversations), sampling_params)
        outputs = []
        for conversation, params in zip(conversations, params_list):
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template, **template_kwargs)
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
            outputs.append(self._generate_one(str(next(self._ids)), text, token_ids, params))
        return outputs

    def _params_for(self, count: int, params: SamplingParams | SequenceOf[SamplingParams] | None) -> list:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise BadRequestError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
        return params

    def _check_token_ids(self, token_ids: list[int]) -> list[int]:
        vocab = self._runner.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad or not token_ids:
            raise BadRequestError(f"prompt token ids must be a non-empty list of integers in [0, {vocab}); "
                                  f"got invalid {bad[:5]}")
        return list(token_ids)

    def _generate_one(self, request_id: str, prompt: str | None, token_ids: list[int],
                      params: SamplingParams) -> RequestOutput:
        runner = self._runner
        if not token_ids:
            raise BadRequestError("the prompt is empty after tokenization; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise BadRequestError(f"the prompt has {len(token_ids)} tokens but the model's context is "
                                  f"{self.max_model_len}; shorten it to leave room for the answer")
        budget = self.max_model_len - len(token_ids)
        new_tokens = min(params.max_tokens or budget, budget)
        blocks = math.ceil((len(token_ids) + new_tokens) / runner.block_size)
        if runner.num_blocks < blocks:
            runner.resize(blocks)
        table = list(range(blocks))

        from enigma.runner import SequenceChunk

        result = RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=token_ids, outputs=[])
        for index in range(params.n):
            sequence = Sequence(index=index, prompt_token_ids=token_ids, params=params, tokenizer=self.tokenizer,
                                eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                                device=runner.device)
            want_prompt_logprobs = params.prompt_logprobs is not None and index == 0
            step = runner.execute([SequenceChunk(token_ids, 0, table, all_logits=want_prompt_logprobs)])
            if want_prompt_logprobs:
                result.prompt_logprobs = self._prompt_logprobs(step.full[0], token_ids, params.prompt_logprobs)
            while True:
                sampled = sample(step.last, [sequence.row])
                sequence.append(sampled.token_ids[0], sampled.logprobs[0])
                if sequence.finished:
                    break
                step = runner.execute([SequenceChunk([sampled.token_ids[0]], sequence.num_tokens - 1, table)])
            result.outputs.append(sequence.to_output())
        result.finished = True
        return result

    def _prompt_logprobs(self, logits: torch.Tensor, token_ids: list[int], k: int) -> list:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        entries: list = [None]
        for position in range(1, len(token_ids)):
            row = top_logprobs(logprobs[position - 1], token_ids[position], k)
            entries.append({tid: type(lp)(lp.logprob, lp.rank, self.tokenizer.decode([tid], skip_special_tokens=False))
                            for tid, lp in row.items()})
        return entries

    # ------------------------------------------------------------ embedding

    @torch.inference_mode()
    def embed(self, texts: str | SequenceOf[str], *, batch_size: int = 32) -> list[EmbeddingRequestOutput]:
        """Embed each text with an embedding model (sentence-transformers pooling)."""
        if self._pooling is None:
            raise BadRequestError(f"model {self.model_name!r} ({self.loaded.architecture}) generates text; "
                                  "embed() needs an embedding model such as a BertModel folder")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        results: list[EmbeddingRequestOutput] = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            ids = [self.tokenizer.encode(text)[: self.max_model_len] for text in batch]
            width = max(len(row) for row in ids)
            input_ids = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for row, token_ids in enumerate(ids):
                input_ids[row, : len(token_ids)] = torch.tensor(token_ids)
                mask[row, : len(token_ids)] = 1
            device = self.backend.device
            states = self.model(input_ids.to(device), mask.to(device))
            vectors = self._pooling(states.float(), mask.to(device)).cpu()
            for text, token_ids, vector in zip(batch, ids, vectors):
                results.append(EmbeddingRequestOutput(request_id=str(next(self._ids)), prompt=text,
                                                      prompt_token_ids=token_ids,
                                                      outputs=EmbeddingOutput(vector.tolist())))
        return results

    def _require_generator(self, what: str) -> None:
        if self._runner is None:
            raise BadRequestError(f"model {self.model_name!r} is an embedding model ({self.loaded.architecture}); "
                                  f"{what}() needs a text-generation model — use embed()")

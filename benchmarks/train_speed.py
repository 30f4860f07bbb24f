"""How fast a student training step runs on this machine: fp32 vs bf16 autocast (where the CPU has
native bf16) and padded-to-max vs length-grouped dynamic padding, at two sequence lengths, all
measured side by side in one run; then a short real `sparsebert train` in each precision, so a
speed-up that costs accuracy shows.

    python benchmarks/train_speed.py [--task mrpc] [--steps 6] [--skip-runs] [--out runs/train-speed]

A step is what the student stage does per batch: the student's forward and backward, the
teacher's forward without autograd, the SparseBERT distillation loss and an AdamW step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

from sparsebert import glue, hardware, offline, sparseml_mends

offline.configure()
sparseml_mends.apply()


def batches(tokenizer, examples, seq_len, batch_size, grouped, count, seed=0):
    """``count`` batches as the trainer builds them: length-grouped and padded per batch
    (transformers' LengthGroupedSampler + DataCollatorWithPadding), or padded to ``seq_len``."""
    import torch
    from transformers import DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    texts = [[e["sentence1"] for e in examples]] + ([[e["sentence2"] for e in examples]] if "sentence2" in examples[0] else [])
    encoded = tokenizer(*texts, truncation=True, max_length=seq_len, padding="max_length" if not grouped else False)
    features = [{k: encoded[k][i] for k in encoded} | {"labels": 0} for i in range(len(examples))]
    if grouped:
        lengths = [len(f["input_ids"]) for f in features]
        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    else:
        order = list(range(len(features)))
    collate = DataCollatorWithPadding(tokenizer)
    return [collate([features[i] for i in order[b * batch_size:(b + 1) * batch_size]]) for b in range(count)]


def time_steps(model_dir, tokenizer, examples, seq_len, precision, grouped, batch_size, steps, warmup=2):
    """Median seconds per training step and per teacher forward, and mean tokens per batch."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from sparsebert.pipeline.modifiers import SparseBertDistillationModifier

    student = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    teacher = copy.deepcopy(student).eval()
    modifier = SparseBertDistillationModifier(start_epoch=0.0)
    modifier.initialize(student, distillation_teacher=teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    step_times, teacher_times = [], []
    data = batches(tokenizer, examples, seq_len, batch_size, grouped, warmup + steps)
    for i, inputs in enumerate(data):
        start = time.perf_counter()
        with torch.autocast(**autocast):
            outputs = student(**inputs)
            loss = modifier.loss_update(outputs.loss, student, optimizer, 0.0, 1,
                                        student_outputs=outputs, student_inputs=inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        middle = time.perf_counter()
        with torch.no_grad(), torch.autocast(**autocast):
            teacher(**{k: v for k, v in inputs.items() if k != "labels"})
        if i >= warmup:
            step_times.append(middle - start)
            teacher_times.append(time.perf_counter() - middle)
    modifier.finalize(student)
    return {"step_ms": statistics.median(step_times) * 1000, "teacher_forward_ms": statistics.median(teacher_times) * 1000,
            "tokens_per_batch": statistics.mean(int(b["attention_mask"].numel()) for b in data)}


def short_runs(task, model, glue_dir, out, precisions):
    """The final dev metric of the same short `sparsebert train` in each precision."""
    from sparsebert.cli import main as sparsebert

    results = {}
    for precision in precisions:
        folder = out / f"run-{precision}"
        started = time.time()
        code = sparsebert(["train", "--task", task, "--model", model, "--glue-dir", str(glue_dir), "--out", str(folder), "--overwrite",
                           "--limit", "2000", "--teacher-epochs", "2", "--student-epochs", "3", "--sparsity", "0.8",
                           "--max-seq-length", "64", "--precision", precision])
        if code:
            raise SystemExit(code)
        metrics = json.loads((folder / "metrics.json").read_text())
        dev = glue.dev_splits(glue.get_task(task))[0]
        results[precision] = {"teacher": metrics["teacher"]["dev"][dev], "student": metrics["student"]["dev"][dev],
                              "baseline": metrics["baseline"][dev], "minutes": (time.time() - started) / 60}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per cell (after 2 warm-up steps)")
    parser.add_argument("--skip-runs", action="store_true", help="only the step timings, no short training runs")
    parser.add_argument("--out", type=Path, default=Path("runs/train-speed"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from sparsebert.models import resolve_model

    torch.set_num_threads(hardware.physical_cores())
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, splits = glue.load_task(args.task, args.glue_dir)
    examples = splits["train"][:2000]
    precisions = ["fp32", "bf16"] if hardware.native_bf16() else ["fp32"]
    machine = hardware.describe()
    print(f"machine: {machine['cpu']} ({', '.join(machine['cpu_features'])}), {torch.get_num_threads()} threads; "
          f"task {args.task}, batch {args.batch_size}" + ("" if "bf16" in precisions else "; no native bf16: fp32 only"))
    rows = []
    for seq_len in (64, 128):
        for grouped in (False, True):
            for precision in precisions:
                cell = time_steps(model_dir, tokenizer, examples, seq_len, precision, grouped, args.batch_size, args.steps)
                rows.append({"sequence_length": seq_len, "batching": "grouped" if grouped else "padded",
                             "precision": precision, **cell})
                print(f"  seq {seq_len:3}  {rows[-1]['batching']:7}  {precision}: step {cell['step_ms']:7.0f} ms, "
                      f"teacher forward {cell['teacher_forward_ms']:6.0f} ms, {cell['tokens_per_batch']:.0f} tokens/batch", flush=True)

    def ms(seq, batching, precision, key="step_ms"):
        return next(r[key] for r in rows if (r["sequence_length"], r["batching"], r["precision"]) == (seq, batching, precision))

    print("\nspeed-ups over fp32 padded to the sequence length (step time):")
    for seq in (64, 128):
        line = [f"grouped fp32 {ms(seq, 'padded', 'fp32') / ms(seq, 'grouped', 'fp32'):.2f}x"]
        if "bf16" in precisions:
            line += [f"padded bf16 {ms(seq, 'padded', 'fp32') / ms(seq, 'padded', 'bf16'):.2f}x",
                     f"grouped bf16 {ms(seq, 'padded', 'fp32') / ms(seq, 'grouped', 'bf16'):.2f}x",
                     f"teacher forward bf16 {ms(seq, 'padded', 'fp32', 'teacher_forward_ms') / ms(seq, 'padded', 'bf16', 'teacher_forward_ms'):.2f}x"]
        print(f"  seq {seq}: " + ", ".join(line))
    report = {"machine": machine, "task": args.task, "batch_size": args.batch_size, "rows": rows}
    if not args.skip_runs:
        report["short_runs"] = short_runs("sst2", args.model, args.glue_dir, args.out, precisions)
        print("\nshort run (SST-2, 2,000 examples, 80% sparsity), final dev accuracy:")
        for precision, r in report["short_runs"].items():
            print(f"  {precision}: teacher {r['teacher']['accuracy']:.2f}, student {r['student']['accuracy']:.2f} "
                  f"(majority baseline {r['baseline']['accuracy']:.2f}), {r['minutes']:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'train_speed.json'}")


if __name__ == "__main__":
    main()

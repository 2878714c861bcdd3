"""Evaluation: multiple-choice tasks, protocols, and a scorer that runs the base model and
many adapters in one fused eval-mode forward per batch.

- `tasks` (torch-free: the API validates with it): `load_task(name_or_path, split="test",
  param=...) -> Task`, the MixLoRA paper's eight tasks read offline or a user's JSONL of
  {"query", "choices", "gold"} rows; `training_rows(task, "paper"|"cloze")`.
- `protocols`: `loglik` (lm-evaluation-harness's multiple_choice: acc, acc_norm, few-shot),
  `paper` (the MixLoRA paper's labelled-choices prompt), `cloze`; requests per question.
- `scorer`: `evaluate(model, tokenizer, adapters, tasks, *, protocol, num_fewshot, limit,
  batch_tokens, progress) -> EvalResults`, adapters already loaded into the AdapterModel
  (None: the base).
- `results` (torch-free): `TaskResult` per (adapter, task) with n, acc, acc_norm and their
  standard errors; `EvalResults.to_json()` / `from_json()`; `format_table`.

Bad input (an unknown task or split, a choice file's bad rows, a setting the protocol does
not take) raises `mixloom.errors.EvaluationError`, a RequestError with `param` and `code`
(a 400 through the API). Import the submodule you need; this package imports none.

A worker evaluating a job's adapter::

    tasks = [load_task(t, param=f"evaluation.tasks[{i}]") for i, t in enumerate(names)]
    results = evaluate(session.model, tokenizer, [None, job_name], tasks, limit=limit,
                       progress=lambda done, total: ...)
    record = results.to_json()  # {"object": "evaluation.results", "data": [TaskResult...]}
"""

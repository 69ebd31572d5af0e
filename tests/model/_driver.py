"""A minimal test driver for ModelRunner: pages allocated up front, no scheduler."""
from gemma4rt.protocol import NewRequestData, SamplingParams, ScheduledRequest, StepPlan


def greedy_generate(runner, prompts, n_steps, params=None, forced=None):
    """Prefill all prompts in one step, then decode n_steps−1 steps together. Returns the
    generated ids per prompt (n_steps each). With `forced` (ids per prompt), each step's input is
    forced's token instead of the sampled one (teacher forcing)."""
    params = params or SamplingParams(temperature=0.0, max_new_tokens=n_steps, min_new_tokens=n_steps)
    nxt = {spec.name: 0 for spec in runner.pool_specs}
    new = []
    for i, p in enumerate(prompts):
        pages = {}
        for spec in runner.pool_specs:
            need = (len(p) + n_steps + spec.page_size - 1) // spec.page_size
            pages[spec.name] = list(range(nxt[spec.name], nxt[spec.name] + need))
            nxt[spec.name] += need
            assert nxt[spec.name] <= spec.num_pages
        new.append(NewRequestData(rid=f"r{i}", token_ids=list(p), num_prompt_tokens=len(p),
                                  sampling=params, pages=pages))
    sched = [ScheduledRequest(rid=f"r{i}", start=0, num_tokens=len(p), new_pages={}, sample=True)
             for i, p in enumerate(prompts)]
    out = [[] for _ in prompts]
    res = runner.execute(StepPlan(step_id=0, new_requests=new, scheduled=sched, removed_rids=[]))
    _take(runner, res, out, forced, 0)
    for step in range(1, n_steps):
        sched = [ScheduledRequest(rid=f"r{i}", start=len(p) + step - 1, num_tokens=1, new_pages={}, sample=True)
                 for i, p in enumerate(prompts)]
        res = runner.execute(StepPlan(step_id=step, new_requests=[], scheduled=sched, removed_rids=[]))
        _take(runner, res, out, forced, step)
    runner.execute(StepPlan(step_id=n_steps, new_requests=[], scheduled=[],
                            removed_rids=[f"r{i}" for i in range(len(prompts))]))
    return out


def _take(runner, res, out, forced, step):
    for s in res.sampled:
        i = int(s.rid[1:])
        out[i].extend(s.token_ids)
        if forced is not None:
            runner.seqs[s.rid].token_ids[-1] = forced[i][step]

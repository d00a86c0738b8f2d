"""The `lock` scenario: the claim modes compared on the same backlog, each the median of `--repeat`
drains: the status drain measured again as this comparison's baseline, then status with
delete-on-publish, the lock claim (one row write per event) and lock with delete-on-publish, each
against its SQL + broker ceiling; a tier that refuses lock mode, or runs the status claim under
it, is reported as not implemented."""

from __future__ import annotations

from bench.run_drain import spread


def run(bench) -> None:
    r = bench.r
    r.say("\n== claim modes: lock (one write per event) and delete-on-publish, same backlog")
    # The status baseline is measured here, next to the runs it is compared with: on a shared
    # machine the background load of a few minutes earlier is not today's.
    d = bench.drain_median("lock-base")
    base = d.rate
    r.add("lock_base", "drain, status (baseline of this comparison)", base, "ev/s",
          r.against(base, r.combined("sql_status_2p"), "status+broker") + f"; CPU {d.cpu_per_1k:.3f} s/1k"
          + spread(d))
    for key, label, env in (
        ("status_delete", "status + delete-on-publish", {"OUTBOX_DELETE_ON_PUBLISH": "true"}),
        ("lock", "lock", {"OUTBOX_CLAIM_MODE": "lock"}),
        ("lock_delete", "lock + delete-on-publish",
         {"OUTBOX_CLAIM_MODE": "lock", "OUTBOX_DELETE_ON_PUBLISH": "true"}),
    ):
        lock_mode = env.get("OUTBOX_CLAIM_MODE") == "lock"
        try:
            d = bench.drain_median(key.replace("_", "-"), watch_processing=lock_mode, **env)
        except RuntimeError as exc:
            if lock_mode and "exited with 2" in str(exc):
                r.add(key, f"drain, {label}", None, "ev/s", "not implemented (the tier refuses the setting)")
                continue
            raise
        # The status claim writes each row twice (claim, mark), a lock-mode claim once.
        if lock_mode and (d.processing_seen or (d.writes_per_event or 0) > 1.5):
            r.add(key, f"drain, {label}", None, "ev/s",
                  f"not implemented ({d.writes_per_event:.2f} row writes per event: the tier ran"
                  f" the status claim, at {d.rate:,.0f}/s)")
            continue
        sql_key, name = {"status_delete": ("sql_status_2p", "status+broker"),
                         "lock": ("sql_lock_2p", "lock+broker"),
                         "lock_delete": ("sql_lock_delete_2p", "lock+delete+broker")}[key]
        r.add(key, f"drain, {label}", d.rate, "ev/s",
              r.against(d.rate, r.combined(sql_key), name) + f"; {d.rate / base:.2f} × status drain"
              + f"; CPU {d.cpu_per_1k:.3f} s/1k; {d.writes_per_event:.2f} row writes/event" + spread(d))
        bench._peak_rss(d.peak_rss)
    best = max((r.value(k) or 0.0 for k in ("lock", "lock_delete")), default=0.0)
    if best:
        r.add("lock_ratio", "  best lock-mode drain / status drain", best / base, "x", "target ≥ 2.00")
        r.target("lock mode ≥ 2 × status mode", best / base >= 2.0,
                 f"{best:,.0f} / {base:,.0f} = {best / base:.2f}")
    else:
        r.add("lock_ratio", "  best lock-mode drain / status drain", None, "x", "not implemented")
        r.target("lock mode ≥ 2 × status mode", None, "lock mode not implemented in the tier yet")

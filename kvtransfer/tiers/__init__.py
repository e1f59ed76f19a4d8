"""KV tiers inside PDConnector: blocks computed once are kept by block hash in a DRAM
LRU and, evicted from there, in NVMe files; a request whose prefix is stored loads it.

    index.py      TierIndex: where each key is (scheduler half; two-phase calls)
    scheduler.py  TierScheduler: lookups, load plans, store plans per request
    plan.py       what the halves pass each other (TierMetadata, TierWorkerMetadata)
    store.py      TierStore: DRAM slots, NVMe files, the copy thread (worker half)
    files.py      the NVMe file format: atomic writes, length and CRC check on read
"""

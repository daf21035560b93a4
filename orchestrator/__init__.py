"""cryoal: deep active learning for cryo-ET subtomograms, on Ray.

Layers, each importing only the ones before it (tests/unit/test_layers.py checks this):

    config.py, faults.py   the configuration; the test-only fault-injection points
    data/                  volumes, pools, storage, ingest, the simulator, images
    nn/                    the networks and one cycle's training recipe (plain PyTorch)
    al/                    strategies, the ledger, oracles, budgets, stopping (numpy)
    actors/ (top level)    classes Ray runs as actors: the scoring actor
    distributed/           Ray: connect(), Ray Train and Ray Data for one cycle
    campaign/              the cycle state machine, its files, report.html, the campaign CLI
    sweep/, annotate/      Ray Tune over campaigns; the labelling page
    run.py                 the command line: dispatches to the commands above

docs/ARCHITECTURE.md has the map and the data flow of one cycle.
"""

"""Every key of the messages between the ServerApp and the ClientApp, in one place.

A train message carries the global model (``ARRAYS``), a config record (``CONFIG``) and, when
clients consolidate with it, the model the previous experience ended with (``BOUNDARY``). The
reply carries the client's model (``ARRAYS``) and a metric record (``METRICS``). Flower's own
FedAvg names ``arrays``, ``config``, ``metrics``, ``server-round`` and the weighting key; the rest
are Lifelong's.
"""

# --------------------------------------------------------------------------- records of a message
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
#: The global model at the end of the previous experience (sent when clients consolidate with it).
BOUNDARY = "boundary"

# --------------------------------------------------------------------------- the train config record
#: The round within this ``strategy.start`` (Flower's FedAvg sets it; 1-based).
SERVER_ROUND = "server-round"
#: The run's whole config, as JSON (a client builds its learner from it).
RUN_CONFIG = "lifelong-config"
EXPERIENCE = "experience"
#: The global round that ends the message's experience (its last round).
EXPERIENCE_END = "experience-end-round"
#: 1: report the personalised model's accuracy (``PERSONAL_ACC``) in this round's reply whatever
#: the round (the virtual clock: a client's last round on an experience is not known in advance).
REPORT_PERSONAL = "report-personal"
#: Rounds before this ``strategy.start``: the global round is ``ROUND_OFFSET + SERVER_ROUND``.
ROUND_OFFSET = "round-offset"
#: Checkpointed runs: the MLflow run id the client's saved state belongs to, the last round the
#: server has durably checkpointed, and (a resumed run) the round each resume of the run went on
#: from, oldest first (a list; its length is the run's attempt: ``clients/state_store.py``).
STATE_RUN = "state-run"
SAVED_ROUND = "checkpointed-round"
RESUME_ROUNDS = "resume-rounds"
#: A resumed run's: the partitions that had trained by the resume round, and the last round each did
#: (a client of these whose saved state is missing refuses to go on empty).
TRAINED_PARTITIONS = "trained-partitions"
TRAINED_ROUNDS = "trained-rounds"
#: User-level DP with clients' own records (``clients/privacy_record.py``): the round's accounted
#: noise multiplier, and the runs the server's ledger holds (this run first).
DP_ACCOUNTED_Z = "dp-accounted-z"
LEDGER_RUNS = "dp-ledger-runs"

# --------------------------------------------------------------------------- the reply's metric record
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
#: The client's sample-level epsilon so far (under ``[privacy.sample]`` only).
SAMPLE_EPSILON = "sample-epsilon"
#: 1 when OnePrompt's VOR phase ran in the round, else 0 (``oneprompt`` only).
VOR_RAN = "vor-ran"
#: At an experience's last round, a learner with local state (replay, regularisers) without DP: its
#: locally trained (personalised) model's accuracy on its own test share of each experience seen so
#: far, a list (NaN where its share is empty).
PERSONAL_ACC = "personal-acc"
#: A client that found its node's state empty mid-run (its SuperNode died and came back) or in a
#: resumed run's first message, and went on from the state it had saved: the round that state is from
#: (-1: it had its state; sent by every client of a checkpointed run whose learner keeps state).
RESTORED_ROUND = "restored-from-round"
#: The noise multipliers of the DP rounds the client recorded in runs not in ``LEDGER_RUNS`` (a list).
PRIOR_DP_ROUNDS = "dp-prior-rounds"

# --------------------------------------------------------------------------- a SuperNode's node config
NODE_PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: Where a node keeps its clients' state.
NODE_STATE_DIR = "client-state-dir"
#: Set by the in-process grid on a virtual client whose Context it let go after its last round
#: (``clients/inprocess.py``): its empty state is expected, and reloading it is no come-back.
NODE_RELEASED = "state-released"

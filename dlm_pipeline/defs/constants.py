"""Names users, tests and the UI share: asset checks, jobs, sensors and schedules."""

CONFIGS_VALID = "configs_valid"
EXPANSION_DETERMINISTIC = "expansion_deterministic"
EXPANSION_MATCHES_WEIGHTS = "expansion_matches_weights"
TOKENS_MATCH_TOKENIZER = "tokens_match_tokenizer"
SPLIT_IS_LEAK_FREE = "split_is_leak_free"
PACKING_CONSERVES_TOKENS = "packing_conserves_tokens"

CORPUS_JOB = "corpus_job"
CONFIG_CHANGE_SENSOR = "config_change_sensor"
SOURCE_CHANGE_SENSOR = "source_change_sensor"
NIGHTLY_SCHEDULE = "nightly_all_seeds"
TOKEN_STORE_MARK = "token_store_mark"  # metadata: the token store namespace it read (TokenStore.namespace_mark)
PARTITION_TAG = "dagster/partition"  # the run tag naming the seed a run materializes
FULL_RESCAN_TAG = "dlm/full_rescan"  # a run tag: "1" computes every step, as --full-rescan does

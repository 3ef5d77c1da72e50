"""Asset check names (constants, so tests, CLI and UI talk about the same checks)."""

CONFIGS_VALID = "configs_valid"
EXPANSION_DETERMINISTIC = "expansion_deterministic"
EXPANSION_MATCHES_WEIGHTS = "expansion_matches_weights"
TOKENS_MATCH_TOKENIZER = "tokens_match_tokenizer"

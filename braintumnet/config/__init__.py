"""Typed configuration: a run config (``[tool.flwr.app.config]``) becomes frozen dataclasses once, at the app's edge.

``profiles`` holds the sections of a run's settings and the named profiles (``quick``, ``standard``, ``paper``);
``run_config`` reads a run config into them (``resolve``) and into the app's settings (``app_config``), and holds the
one boolean and override parser.
"""

from braintumnet.config.profiles import (AGGREGATIONS, GATE_REGIONS, MODEL_MODES, PROFILES, SERVER_LEARNING_RATES,
                                         SERVER_OPTIMIZERS, ConfigError, DataConfig, FederationConfig, ModelConfig,
                                         PrivacyConfig, Profile, RobustConfig, ServerOptimizerConfig, TrainConfig,
                                         at_site, from_dict, get_profile, site_batch, to_dict)
from braintumnet.config.run_config import (APP_KEYS, DEFAULT_PROFILE, LITERAL_KEYS, LITERAL_SECTIONS, RUN_CONFIG_KEYS,
                                           AppConfig, app_config, check_keys, defaults, known_keys, parse_bool,
                                           parse_overrides, resolve)

__all__ = ["AGGREGATIONS", "APP_KEYS", "DEFAULT_PROFILE", "GATE_REGIONS", "LITERAL_KEYS", "LITERAL_SECTIONS",
           "MODEL_MODES", "PROFILES", "RUN_CONFIG_KEYS", "SERVER_LEARNING_RATES", "SERVER_OPTIMIZERS", "AppConfig",
           "ConfigError", "DataConfig", "FederationConfig", "ModelConfig", "PrivacyConfig", "Profile", "RobustConfig",
           "ServerOptimizerConfig", "TrainConfig", "app_config", "at_site", "check_keys", "defaults", "from_dict",
           "get_profile", "known_keys", "parse_bool", "parse_overrides", "resolve", "site_batch", "to_dict"]

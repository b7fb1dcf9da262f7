"""hoexp's Hydra configs (read through pkg://hoexp.conf); a group per folder, mirroring hoexp/."""

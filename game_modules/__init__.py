"""Game modules for gridserver. Name one in the INI file: ``[game] module = game_modules.walkers``."""

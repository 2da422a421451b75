"""`bleuberi run`: the whole recipe (select, train, eval) in one run folder, from one config."""

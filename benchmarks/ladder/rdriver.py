"""The R side: the lme4 worker script (run by ``Rscript``; it reads the same column files and
follows the same protocol as the Python workers), the probe of R's versions and BLAS, and the
probe of the peer environment's interpreter (``run.py --probe-peers``).
"""
from __future__ import annotations

import shutil
from typing import Optional

from ladder.child import ChildTimeout, run_child
from ladder.common import HERE

R_WORKER = r"""
args <- commandArgs(trailingOnly = TRUE)
spec <- jsonlite::fromJSON(args[[1]], simplifyVector = FALSE)
memory_mb <- function() {
  f <- "/proc/self/status"
  if (!file.exists(f)) return(list(rss = NA, hwm = NA))
  s <- readLines(f)
  get <- function(key) as.numeric(gsub("[^0-9]", "", grep(paste0("^", key, ":"), s, value = TRUE))) / 1024
  list(rss = get("VmRSS"), hwm = get("VmHWM"))
}
suppressPackageStartupMessages(library(lme4))
read_columns <- function(spec) {
  n <- as.integer(spec$nrow)
  d <- list()
  for (col in spec$columns) {
    con <- file(col$file, "rb")
    if (identical(col$kind, "factor")) {
      codes <- readBin(con, "integer", n = n, size = 4L, endian = "little")
      d[[col$name]] <- structure(codes + 1L, levels = as.character(unlist(col$levels)),
                                 class = "factor")
    } else {
      d[[col$name]] <- readBin(con, "double", n = n, size = 8L, endian = "little")
    }
    close(con)
  }
  structure(d, class = "data.frame", row.names = c(NA_integer_, -n))
}
d <- read_columns(spec)
form <- as.formula(spec$r_formula)
msgs <- character(0)
fit <- function() withCallingHandlers(
  lmer(form, data = d, REML = spec$reml),
  warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
  message = function(m) { msgs <<- c(msgs, trimws(conditionMessage(m))); invokeRestart("muffleMessage") })
one <- function() {
  invisible(gc())
  w0 <- Sys.time(); c0 <- proc.time()
  m <- fit()
  c1 <- proc.time(); w1 <- Sys.time()
  w <- as.numeric(difftime(w1, w0, units = "secs"))
  cat("BENCH_FITTED ", w, "\n", sep = ""); flush(stdout())
  list(m = m, wall = w, cpu = (c1 - c0)[["user.self"]] + (c1 - c0)[["sys.self"]])
}
invisible(gc())
base <- memory_mb()
cat("BENCH_START\n"); flush(stdout())
t_start <- Sys.time()
wall <- numeric(0); cpu <- numeric(0); warm_kept <- FALSE
min_repeat <- if (is.null(spec$min_repeat$lme4)) 1 else spec$min_repeat$lme4
warm <- 0
warmup_time <- if (is.null(spec$warmup_time)) 0 else spec$warmup_time
# one fit alive at a time: the last one is dropped before the next begins
for (i in seq_len(if (warmup_time > 0) max(spec$warmup, 1) else spec$warmup)) {
  r <- NULL; m <- NULL
  r <- one(); m <- r$m; warm <- warm + r$wall
  if (r$wall >= spec$budget) { wall <- r$wall; cpu <- r$cpu; warm_kept <- TRUE; break }
}
while (!warm_kept && warm < warmup_time) {   # short fits: warm up for warmup_time seconds
  r <- NULL; m <- NULL
  r <- one(); m <- r$m; warm <- warm + r$wall
}
repeat {
  enough <- length(wall) >= spec$nrepeat || sum(wall) >= spec$budget
  if (length(wall) >= max(1, min_repeat) && enough) break
  elapsed <- as.numeric(difftime(Sys.time(), t_start, units = "secs"))
  if (length(wall) >= 1 && !is.null(spec$timeout) && elapsed + max(wall) > spec$timeout) break
  r <- NULL; m <- NULL
  r <- one(); m <- r$m
  wall <- c(wall, r$wall); cpu <- c(cpu, r$cpu)
}
cat("BENCH_FITTED done\n"); flush(stdout())
peak <- memory_mb()$hwm
conv <- m@optinfo$conv$opt
out <- list(tool = "lme4", wall = I(wall), cpu = I(cpu), feval = m@optinfo$feval,
            objective = -2 * as.numeric(logLik(m)), converged = identical(as.integer(conv), 0L),
            warm_kept = warm_kept, messages = I(unique(msgs)), base_mb = base$rss,
            peak_mb = peak)
cat("BENCH_JSON:", jsonlite::toJSON(out, auto_unbox = TRUE, digits = NA, na = "null"), "\n", sep = "")
"""

R_PROBE = r"""
ok <- requireNamespace("lme4", quietly = TRUE) && requireNamespace("jsonlite", quietly = TRUE)
out <- list(ok = ok, R = R.version.string, blas = unname(extSoftVersion()[["BLAS"]]),
            lapack = La_library())
if (ok) out$lme4 <- as.character(packageVersion("lme4"))
if (ok) out$Matrix <- as.character(packageVersion("Matrix"))
cat("BENCH_JSON:", if (ok) jsonlite::toJSON(out, auto_unbox = TRUE) else
    sprintf('{"ok": false, "R": "%s"}', R.version.string), "\n", sep = "")
"""


def probe_r(env: dict) -> Optional[dict]:
    """Versions and BLAS of R, or None when ``Rscript``, lme4 or jsonlite is missing."""
    if shutil.which("Rscript") is None:
        return None
    try:
        info = run_child(["Rscript", "-e", R_PROBE], env)
    except (RuntimeError, ChildTimeout):
        return None
    return info if info.get("ok") else None


def probe_peers(python: Optional[str], env: dict) -> dict:
    """``{"python": ..., dist: version}`` of the peer environment ({} if unusable)."""
    if not python:
        return {}
    try:
        return run_child([python, str(HERE / "run.py"), "--probe-peers"], env)
    except (RuntimeError, ChildTimeout, OSError):
        return {}

"""How the ``metallm`` command line ends: its exit codes, and every failure a person can fix
told in one line on stderr (not a traceback) with the code that says what to do — a database
that does not answer (its URL shown without the password), a schema never migrated or behind
the code, a Kafka broker that does not answer, a bad setting, config or input file."""

from __future__ import annotations

import sys
from collections.abc import Callable

from service.settings import Settings, describe_settings_error, shown_url

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and failed (a consumer crashed, no such decision, …)
EXIT_INPUT = 2  # fix something first: arguments, settings, config or input file, the schema
EXIT_UNREACHABLE = 3  # the database or the Kafka broker did not answer
EXIT_TOPICS_CHANGED = 4  # serve: the queries or labels topic changed under it (broker restart)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "the command ran and failed (a consumer crashed, the final checkpoint failed, "
    "no such decision, the service decided differently in bench --through-service, the arm "
    "failed or no decision came in time for ask)",
    EXIT_INPUT: "bad arguments, settings, config file (or an arm of it that cannot start) or "
    "input file, METALLM_METRICS_PORT taken, a database schema "
    "missing or behind the code (run `metallm migrate`), or queries and labels topics without "
    "METALLM_TOPIC_PARTITIONS partitions, or a query the service rejected (ask)",
    EXIT_UNREACHABLE: "the database or the Kafka broker cannot be reached",
    EXIT_TOPICS_CHANGED: "serve stopped: the queries or labels topic was deleted or recreated "
    "with other partitions while it served (a broker restarted without its data)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def fail(message: str, code: int) -> int:
    """Print ``metallm: message`` on stderr and give back ``code``."""
    print(f"metallm: {message}", file=sys.stderr)
    return code


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if none).

    >>> first_line(ValueError("\\n  bad value\\nmore detail"))
    'bad value'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def run_told(settings: Settings, command: Callable[[], int]) -> int:
    """Run ``command``; a failure a person can fix ends it in one line with its exit code."""
    import sqlalchemy.exc as sa_exc
    from kafka.errors import KafkaError
    from pydantic import ValidationError

    from app.application import SchemaMissing
    from consumers.kafka_io import BrokerUnreachable, TopicMismatch, TopicsChanged
    from producers.files import InputFileError
    from service.config import ConfigError
    from service.learning import ContextMismatch
    from service.log.checkpoints import WarmStartRefused
    from service.log.session import InstanceNameTaken
    from service.metrics import MetricsPortUnavailable
    from service.outcomes import OutcomesError

    input_errors = (
        ConfigError,
        ContextMismatch,
        InputFileError,
        InstanceNameTaken,
        MetricsPortUnavailable,
        SchemaMissing,
        TopicMismatch,
        OutcomesError,
        WarmStartRefused,
    )
    try:
        return command()
    except input_errors as exc:
        return fail(str(exc), EXIT_INPUT)
    except ValidationError as exc:
        return fail(describe_settings_error(exc), EXIT_INPUT)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # a file named on the command line or in a setting (an input, outcomes or model file)
        return fail(
            f"cannot read {exc.filename}: {exc.strerror}" if exc.filename else str(exc),
            EXIT_INPUT,
        )
    except BrokerUnreachable as exc:
        return fail(str(exc), EXIT_UNREACHABLE)
    except TopicsChanged as exc:
        return fail(str(exc), EXIT_TOPICS_CHANGED)
    except KafkaError as exc:
        return fail(
            f"Kafka broker at {settings.kafka_bootstrap}: {first_line(exc)} "
            "(METALLM_KAFKA_BOOTSTRAP)",
            EXIT_UNREACHABLE,
        )
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        reason = first_line(exc.orig if exc.orig is not None else exc)
        return fail(
            f"cannot use the database at {shown_url(settings.database_url)}: {reason}",
            EXIT_UNREACHABLE,
        )
    except sa_exc.ProgrammingError as exc:
        return fail(_schema_missing(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _schema_missing(exc: BaseException) -> str:
    """The line for a query on a schema that is not there; anything else is re-raised."""
    import psycopg.errors

    orig = getattr(exc, "orig", None)
    if not isinstance(orig, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)):
        raise exc
    return f"the database schema is missing ({first_line(orig)}): run `metallm migrate`"

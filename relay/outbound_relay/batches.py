"""One message's upstream transactions when the upstream caps the recipients of a transaction: the first,
then one more for the recipients it refused as over its cap (`452 4.5.3`), and so on, as RFC 5321
4.5.3.1.10 asks of a client (docs/delivery.md, "Recipients the upstream refuses"). This module keeps the
account; delivery.py sends the transactions and says what each came to."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from outbound_relay.reply import Reply
from outbound_relay.session import Sent, Transaction, over_cap, refused_at

# Further transactions start only within a budget after the first one ended; the rest are then reported
# to the sender, so that the app's reply to DATA does not wait past its own timeout (which would make it
# send the message again to those who have it).
LATE = Reply.of(451, "4.4.7", "not sent: the relay's time for further transactions ran out")


@dataclass
class Batches:
    message: Transaction
    budget: float  # seconds after the first transaction's end in which further ones may start
    batch: Transaction | None = None  # the transaction to send next; None when all are done
    indices: list[int] = field(default_factory=list)  # its recipients' places in `message`
    first: bool = True  # the batch is the first transaction: it may be deferred, or fail, as a whole
    reply: Reply | None = None  # the first transaction's reply: the app's
    settled: list[tuple[str, Reply]] = field(default_factory=list)  # refused, and so told to the sender
    uncertain: list[str] = field(default_factory=list)  # in a transaction lost after its message went out
    retried: bool = False  # the batch was tried on a new session already
    deadline: float = 0.0  # the loop's time after which no further transaction starts

    def __post_init__(self) -> None:
        self.batch, self.indices = self.message, list(range(len(self.message.rcpt_tos)))

    def took(self, sent: Sent, now: float) -> None:
        """The upstream's answer to the batch."""
        assert self.batch is not None
        batch, self.retried = self.batch, False
        if self.first:
            self.first, self.reply, self.deadline = False, sent.reply, now + self.budget
            if not sent.reply.is_positive:  # nobody got it: the app hears this, and nobody else anything
                self.batch = None
                return
        elif not sent.reply.is_positive:
            self.settled += [(rcpt, sent.reply) for rcpt in batch.rcpt_tos]
            self.batch = None
            return
        refused = refused_at(batch.rcpt_tos, sent.refused)
        self.settled += [(batch.rcpt_tos[at], reply) for at, reply in refused if not over_cap(reply)]
        over = [self.indices[at] for at, reply in refused if over_cap(reply)]
        if over and now > self.deadline:
            self.settled += [(self.message.rcpt_tos[index], LATE) for index in over]
            over = []
        self.batch = None if not over else self._of(over)
        self.indices = over

    def lost(self, reply: Reply, *, maybe_delivered: bool) -> None:
        """A further transaction failed: its recipients did not get the message (told to the sender),
        or may have (told to nobody: a failure notice would make the sender send it again)."""
        assert self.batch is not None
        assert not self.first
        if maybe_delivered:
            self.uncertain += self.batch.rcpt_tos
        else:
            self.settled += [(rcpt, reply) for rcpt in self.batch.rcpt_tos]
        self.batch = None

    def sent(self) -> Sent:
        assert self.reply is not None
        return Sent(self.reply, tuple(self.settled) if self.reply.is_positive else ())

    def _of(self, indices: list[int]) -> Transaction:
        message = self.message
        return replace(
            message,
            rcpt_tos=tuple(message.rcpt_tos[index] for index in indices),
            rcpt_dsn=tuple(message.dsn_of(index) for index in indices),
        )

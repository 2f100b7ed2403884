"""
The Telegram bot's side of crews: its users join crews by code and send to
them like a device.  Answers are typed values; their HTTP shapes are the web
layer's (L{leeloo.web.BotAPI}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo import messages
from leeloo.core.defaults import TELEGRAM_DEVICE_ID
from leeloo.messages import NotInCrew, StoreUnavailable

if TYPE_CHECKING:
    from leeloo.core.admission import Admission
    from leeloo.core.crews import Crew, Crews
    from leeloo.core.delivery import Delivery
    from leeloo.store import Journal

_log = Logger()


@dataclass(frozen=True, slots=True)
class BotCrew:
    """
    A crew a bot user is in: its code, the user's name in it, and how many
    of its devices are online.
    """

    crew_code: str
    display_name: str
    devices_online: int


@dataclass(frozen=True, slots=True)
class CrewStatus:
    """
    What anyone with a crew's code may know of it (C{exists} false, and
    no one, for a code no crew has).
    """

    crew_code: str
    exists: bool
    device_names: list[str]
    telegram_user_names: list[str]


class BotUsers:
    def __init__(self, journal: Journal, crews: Crews, delivery: Delivery, admission: Admission) -> None:
        self.journal = journal
        self.crews = crews
        self.delivery = delivery
        self.admission = admission

    def create_crew(self, user_id: str, name: str) -> Deferred:
        """
        A new crew with a bot user in it; fires with its code once it is
        durable, or fails with L{StoreUnavailable}.
        """
        if self.crews.fanout.shared:
            return self.crews.reserve_code().addCallback(self._create_crew, user_id, name)
        return self._create_crew(self.crews.unused_code(), user_id, name)

    def _create_crew(self, code: str, user_id: str, name: str) -> Deferred:
        crew = self.crews.create(code, f"telegram:{user_id}")
        self.crews.add_bot_user(crew, user_id, name)

        def failed(failure: Any) -> None:
            _log.error("crew {crew_code} was not stored: {error}",
                       crew_code=crew.code, error=failure.getErrorMessage())
            raise StoreUnavailable("the crew could not be stored; try again")

        return self.journal.barrier().addCallbacks(lambda _: crew.code, failed)

    def join_crew(self, user_id: str, code: str, name: str) -> tuple[str, int]:
        """
        Put a bot user in a crew; return the crew's code and how many of
        its devices are online.
        """
        self.admission.check_bot_join(user_id)
        crew = self._crew(code, user_id)
        self.crews.add_bot_user(crew, user_id, name)
        return crew.code, self.crews.online_count(crew)

    def message(self, user_id: str, code: str, sender_name: str, msg_type: str, payload: dict) -> Deferred:
        """
        A bot user's message to a crew it joined.  Fires with the devices
        reached once it is stored and delivered.
        """
        crew = self._crew(code, user_id)
        if user_id not in crew.bot_users:
            raise NotInCrew(f"join crew {crew.code} before sending to it")
        message = messages.RelayedMessage(TELEGRAM_DEVICE_ID, sender_name, msg_type, payload)
        return self.delivery.publish(crew, message, TELEGRAM_DEVICE_ID, size=len(messages.encode(message)))

    def _crew(self, code: str, user_id: str) -> Crew:
        """
        The crew of C{code} as bot user C{user_id} means it: the crew it is
        in that was renamed from C{code}, if there is one.

        @raise InvalidCrewCode: there is none.
        """
        if self.crews.aliases:
            code = self.crews.resolve(messages.normalize_crew_code(code), None, user_id)
        return self.crews.known(code)

    def user_crews(self, user_id: str) -> list[BotCrew]:
        """
        The crews bot user C{user_id} is in, in the order it joined them.
        """
        crews = []
        for code in self.crews.bot_user_index.get(user_id, ()):
            crew = self.crews.crews.get(code)
            if crew is not None and user_id in crew.bot_users:
                crews.append(BotCrew(code, crew.bot_users[user_id], self.crews.online_count(crew)))
        return crews

    def crew_status(self, code: str) -> CrewStatus:
        code = messages.normalize_crew_code(code)
        crew = self.crews.crews.get(code)
        if crew is None:
            return CrewStatus(code, False, [], [])
        return CrewStatus(code, True, self.crews.online_names(crew),
                          list(crew.bot_users.values()))

"""
L{leeloo.core.bot}: the Telegram bot's users, their crews and their
messages.
"""

from twisted.internet.defer import maybeDeferred

from leeloo import web
from leeloo.messages import StoreUnavailable
from leeloo.testing import FailingMemoryStore
from tests.core.support import T0, BoundsTestCase, DeliveryTestCase, HeldStore, RelayTestCase, bot_crews


class BotTests(RelayTestCase):
    def test_bot_message_reaches_devices(self):
        """
        A bot user's message reaches every online device of its crew with
        from_device "telegram".
        """
        a, b = self.crew_of(2)
        self.relay.bot_join_crew("42", "alpha", "Tom")
        reached = self.successResultOf(self.relay.bot_message("42", "ALPHA", "Tom", "text", {"text": "yo"}))
        self.assertEqual(reached, 2)
        for d in (a, b):
            self.assertEqual(
                d.take(),
                [{"type": "message", "from_device": "telegram", "from_name": "Tom", "msg_type": "text",
                  "payload": {"text": "yo"}, "timestamp": int(T0 * 1000), "seq": 1, "id": "m1",
                  "crew_code": "ALPHA"}],
            )

    def test_bot_not_in_crew(self):
        """
        A bot user who has not joined a crew cannot send to it.
        """
        self.crew_of(1)
        from leeloo.messages import NotInCrew

        self.assertRaises(NotInCrew, self.relay.bot_message, "42", "ALPHA", "Tom", "text", {})

    def test_bot_create_and_status(self):
        """
        A crew created by a bot user lists that user; devices joining show up
        in its status.
        """
        code = self.successResultOf(self.relay.bot_create_crew("7", "Tina"))
        d = self.device()
        d.send(type="join_crew", crew_code=code, device_name="Den")
        self.assertEqual(
            web.crew_status(self.relay.crew_status(code.lower())),
            {"crew_code": code, "exists": True, "devices_online": 1, "device_names": ["Den"],
             "telegram_users": 1, "telegram_user_names": ["Tina"]},
        )

    def test_status_unknown(self):
        """
        The status of an unknown crew says it does not exist.
        """
        self.assertEqual(
            web.crew_status(self.relay.crew_status("ZZZ")),
            {"crew_code": "ZZZ", "exists": False, "devices_online": 0, "device_names": [],
             "telegram_users": 0, "telegram_user_names": []},
        )


class BotUserCrewsTests(RelayTestCase):
    def created(self, user_id, name):
        """
        The code of a crew the bot user creates (once it is durable, if the
        relay waits for that).
        """
        return self.successResultOf(maybeDeferred(self.relay.bot_create_crew, user_id, name))

    def test_crews_of_user(self):
        """
        bot_user_crews lists a user's crews in join order with its name
        there and the devices online; another user's are not listed.
        """
        self.crew_of(2, "HOME")
        self.relay.bot_join_crew("7", "home", "Tina")
        code = self.created("7", "T.")
        self.created("8", "Other")
        self.assertEqual(bot_crews(self.relay, "7"), [
            {"crew_code": "HOME", "display_name": "Tina", "devices_online": 2},
            {"crew_code": code, "display_name": "T.", "devices_online": 0},
        ])
        self.assertEqual(bot_crews(self.relay, "9"), [])

    def test_pruned_crew_forgotten(self):
        """
        A crew pruned as idle leaves the user's list.
        """
        self.created("7", "Tina")
        self.clock.advance(91 * 86400)
        self.relay.prune()
        self.assertEqual(bot_crews(self.relay, "7"), [])
        self.assertEqual(self.relay.bot_user_index, {})


class SequenceTests(DeliveryTestCase):
    def test_bot_messages_logged(self):
        """
        Bot messages are logged and replayed like device messages.
        """
        a = self.device("a")
        a.close()
        self.relay.bot_join_crew("7", "ALPHA", "Tom")
        self.relay.bot_message("7", "ALPHA", "Tom", "text", {"text": "from telegram"})
        back = self.device("a")
        self.assertEqual(back.texts(), ["from telegram"])


class BotUserRestoreTests(DeliveryTestCase):
    def test_user_crews_restored(self):
        """
        A restarted relay still knows which crews a bot user is in.
        """
        self.device("a", crew="HOME")
        self.relay.bot_join_crew("7", "home", "Tina")
        relay = self.make_relay()
        self.assertEqual([web.bot_crew(c) for c in relay.bot_user_crews("7")],
                         [{"crew_code": "HOME", "display_name": "Tina", "devices_online": 0}])


class DurableCreateTests(BoundsTestCase):
    def setUp(self):
        super().setUp()
        self.store = HeldStore()
        self.relay = self.make_relay()

    def test_bot_crew_once_stored(self):
        """
        The bot API's new crew fires with its code only once stored.
        """
        d = self.relay.bot_create_crew("1", "Tina")
        self.assertNoResult(d)
        self.store.release()
        self.assertIn(self.successResultOf(d), self.store.crews)

    def test_bot_crew_not_stored(self):
        """
        A bot crew the store refuses fails with StoreUnavailable.
        """
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()
        self.store.fail_with = OSError("disk full")
        d = self.relay.bot_create_crew("1", "Tina")
        self.clock.advance(self.relay.journal.retry_delay)
        self.failureResultOf(d, StoreUnavailable)

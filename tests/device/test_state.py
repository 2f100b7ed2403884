"""
L{leeloo.device.state}: the state directory, in the formats deployed
devices read and write.
"""

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from leeloo.device.state import DeviceState, StateError, atomic_write


class StateTestCase(SynchronousTestCase):

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, obj):
        with open(self.path(name), "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))

    def read(self, name):
        with open(self.path(name)) as f:
            return json.load(f)

    def mode(self, name):
        return stat.S_IMODE(os.stat(self.path(name)).st_mode)


class CrewConfigTests(StateTestCase):

    def test_reads_the_current_format(self):
        """
        device_id, crew_id, crew_code and display_name are read as the
        deployed client writes them.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_id": "LEELOO-7X3K",
                                        "crew_code": "LEELOO-7X3K", "display_name": "Ann"})
        c = DeviceState(self.dir).config
        self.assertEqual((c.device_id, c.crew_id, c.crew_code, c.display_name),
                         ("leeloo_aaaaaaaaaaaa", "LEELOO-7X3K", "LEELOO-7X3K", "Ann"))

    def test_reads_the_older_format(self):
        """
        The older form names the crew invite_code and the device name.
        """
        self.write("crew_config.json", {"name": "Bob", "invite_code": "LEELOO-ABCD", "is_creator": False,
                                        "members": ["Ann"]})
        c = DeviceState(self.dir).config
        self.assertEqual((c.crew_code, c.display_name, c.device_id), ("LEELOO-ABCD", "Bob", ""))

    def test_missing_directory_and_files_mean_a_fresh_device(self):
        """
        A state directory that does not exist is created (0700) and the
        device starts with no id, no crew, no key and an empty outbox.
        """
        state = DeviceState(self.path("new"))
        self.assertEqual((state.config.device_id, state.config.crew_code, state.device_key, state.outbox,
                          state.last_seq), ("", "", None, [], {}))
        self.assertEqual(self.mode("new"), 0o700)

    def test_save_writes_the_four_fields_and_keeps_the_rest(self):
        """
        Saving writes the deployed client's four fields and keeps every
        other field of the file; an older-format file keeps invite_code and
        name in step, so the deployed UI (which reads them first) agrees.
        """
        self.write("crew_config.json", {"name": "Bob", "invite_code": "OLD", "members": ["Ann"]})
        state = DeviceState(self.dir)
        state.config.device_id = "leeloo_bbbbbbbbbbbb"
        state.config.crew_code = state.config.crew_id = "NEW"
        state.save_config()
        self.assertEqual(self.read("crew_config.json"), {
            "name": "Bob", "invite_code": "NEW", "members": ["Ann"], "device_id": "leeloo_bbbbbbbbbbbb",
            "crew_id": "NEW", "crew_code": "NEW", "display_name": "Bob"})

    def test_invalid_json_names_the_file(self):
        """
        A crew_config.json that is not JSON is a StateError naming it; it
        is not overwritten.
        """
        self.write("crew_config.json", "{not json")
        e = self.assertRaises(StateError, DeviceState, self.dir)
        self.assertIn("crew_config.json", str(e))
        with open(self.path("crew_config.json")) as f:
            self.assertEqual(f.read(), "{not json")


class FilesTests(StateTestCase):

    def test_device_key_is_alone_in_its_own_file(self):
        """
        The device key is written alone to device_key, mode 0600, and read
        back; crew_config.json never holds it.
        """
        state = DeviceState(self.dir)
        state.save_key("s3cret")
        state.save_config()
        with open(self.path("device_key")) as f:
            self.assertEqual(f.read().strip(), "s3cret")
        self.assertEqual(self.mode("device_key"), 0o600)
        self.assertNotIn("s3cret", json.dumps(self.read("crew_config.json")))
        self.assertEqual(DeviceState(self.dir).device_key, "s3cret")

    def test_positions_and_outbox_round_trip(self):
        """
        relay_state.json keeps the last seq per crew and outbox.json the
        unconfirmed messages, across a restart.
        """
        state = DeviceState(self.dir)
        state.last_seq["ALPHA"] = 12
        state.save_positions()
        entry = {"client_msg_id": "c1", "crew_code": "ALPHA", "message": {"type": "message"}}
        state.outbox.append(entry)
        state.save_outbox()
        again = DeviceState(self.dir)
        self.assertEqual((again.last_seq, again.outbox), ({"ALPHA": 12}, [entry]))
        self.assertEqual(self.read("relay_state.json"), {"last_seq": {"ALPHA": 12}})

    def test_spotify_tokens_are_exactly_the_tokens_object(self):
        """
        spotify_tokens.json holds exactly the tokens object, as the
        deployed client writes it, readable only by the device's user.
        """
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
        DeviceState(self.dir).save_tokens(tokens)
        self.assertEqual(self.read("spotify_tokens.json"), tokens)
        self.assertEqual(self.mode("spotify_tokens.json"), 0o600)


class AtomicWriteTests(StateTestCase):

    def test_replaces_the_file(self):
        """
        atomic_write replaces the file's content with the given mode and
        leaves no temporary file behind.
        """
        from pathlib import Path

        target = Path(self.path("f.json"))
        target.write_text("old")
        atomic_write(target, b"new", mode=0o600)
        self.assertEqual(target.read_text(), "new")
        self.assertEqual(self.mode("f.json"), 0o600)
        self.assertEqual(os.listdir(self.dir), ["f.json"])

    def test_failed_write_keeps_the_old_file(self):
        """
        When the rename fails, the old file is untouched and the temporary
        file is removed.
        """
        from pathlib import Path

        target = Path(self.path("f.json"))
        target.write_text("old")

        def broken(src, dst):
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", broken)
        self.assertRaises(OSError, atomic_write, target, b"new")
        self.assertEqual(target.read_text(), "old")
        self.assertEqual(os.listdir(self.dir), ["f.json"])

"""Celery's Redis broker, with no moment where a message taken off a queue is held only by the worker.

kombu's Redis transport takes a message with BRPOP and records it in the unacked hash afterwards, from the worker:
a worker killed in between (a few ms per message, more while its pool is busy) loses the message for good; it
is neither queued nor unacknowledged. Here one Lua script takes the message and records it in the same step, and
a worker whose queues are empty waits with BLMOVE from a queue to its own tail (Redis 6.2+; Debian 12 and Ubuntu
24.04 ship 7.0), which wakes it without taking anything. Publishing, acknowledging and restoring stay kombu's.
Fanout (the pidbox) is SUBSCRIBE to exact channels, which a Redis ACL user limited to the app's prefix may use.
"""

from queue import Empty
from time import monotonic, time

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

# KEYS: the queue keys in the order BRPOP would take them, then the unacked hash and its index; ARGV[1]: the time.
# The hash entry is the one kombu writes ([message, exchange, routing key]), the message kept byte for byte.
TAKE_AND_RECORD = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, #KEYS - 2 do
    local item = redis.call('RPOP', KEYS[i])
    if item then
        local ok, message = pcall(cjson.decode, item)
        if ok and type(message) == 'table' and type(message.properties) == 'table' then
            local tag = message.properties.delivery_tag
            local info = message.properties.delivery_info
            if type(tag) == 'string' and type(info) == 'table' then
                redis.call('ZADD', index, ARGV[1], tag)
                redis.call('HSET', unacked, tag,
                    '[' .. item .. ', ' .. cjson.encode(info.exchange) .. ', ' .. cjson.encode(info.routing_key) .. ']')
            end
        end
        return {KEYS[i], item}
    end
end
return false
"""


class QoS(redis.QoS):
    """kombu's acknowledgement emulation, minus writing what the take script has already recorded."""

    def append(self, message, delivery_tag):
        if delivery_tag == self.channel.taken_tag:
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(redis.Channel):
    """A Redis channel that takes each message and records it as unacknowledged in one step."""

    QoS = QoS
    # NOTE: Redis's ACL admits a PSUBSCRIBE only to a pattern its rules spell out literally, so the app's user
    # (channels under the key prefix: &prayer-room:*) may not PSUBSCRIBE to kombu's fanout topics (the pidbox that
    # `celery inspect` and remote control use). One topic per exchange, no routing key in it, and SUBSCRIBE instead,
    # whose channel the ACL matches against the prefix's pattern.
    fanout_patterns = False
    taken_tag = None  # the delivery tag of the message being handed over, already in the unacked hash
    _queues_empty = False  # the last take found nothing: wait for a message before the next one
    _sent = None  # the command whose reply the poller waits for

    def _subscribe(self):
        keys = [topic for queue in self.active_fanout_queues for topic in self._get_subscribe_topics(queue)]
        if not keys:
            return
        client = self.subclient
        if client.connection._sock is None:
            client.connection.connect()
        self._in_listen = client.connection
        client.subscribe(keys)

    def _unsubscribe_from(self, queue):
        client = self.subclient
        if client.connection and client.connection._sock:
            client.unsubscribe(self._get_subscribe_topics(queue))

    def _brpop_start(self, timeout=None):
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        prefix = self.global_keyprefix or ""
        keys = [prefix + self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self._queues_empty:
            # Wakes when the first queue holds a message (moved from its tail back to its tail: untouched), or after
            # the timeout; every queue and priority is taken from by the script that follows.
            wait = self.brpop_timeout if timeout is None else timeout
            command = ["BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", wait or 0]
        else:
            recorded = [prefix + self.unacked_key, prefix + self.unacked_index_key]
            command = ["EVAL", TAKE_AND_RECORD, len(keys) + 2, *keys, *recorded, time()]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._sent = command[0]
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options):
        command, self._sent = self._sent, None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if command == "BLMOVE" or not reply:
                self._queues_empty = command != "BLMOVE"
                raise Empty()
            key, item = (bytes_to_str(part) for part in reply)
            queue = key[len(self.global_keyprefix or "") :].rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            message = loads(item)
            self.taken_tag = message.get("properties", {}).get("delivery_tag")
            try:
                self.connection._deliver(message, queue)
            finally:
                self.taken_tag = None
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(redis.Transport):
    """kombu's Redis transport with the channel above; selected by CELERY_BROKER_TRANSPORT for redis:// URLs."""

    Channel = Channel

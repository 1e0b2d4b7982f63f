/*
 * Whether a consumed message may carry headers, without parsing them.
 *
 * librdkafka's rd_kafka_message_headers() parses a message's header section
 * on first access, allocating and freeing a parse buffer even when the
 * section only says "0 headers" (librdkafka 2.12.1, rd_kafka_msg_headers_parse):
 * about 1,100 instructions per record, an eighth of kawka's own. Every
 * record of an event stream without headers paid it (see BENCHMARKS.md).
 *
 * This reads the two fields rd_kafka_message_headers() itself looks at
 * first. It is compiled by build.rs against the very librdkafka tree
 * rdkafka-sys built and linked (DEP_RDKAFKA_ROOT, with its config.h), so the
 * struct layout is that library's by construction.
 */
#include "rdkafka_int.h"
#include "rdkafka_msg.h"

/*
 * 0 when `rkmessage` (a consumed message) has no header to read: none parsed
 * yet and a header section of at most one byte, the count alone. A count of
 * one byte with nothing after it is 0 or -1 (no headers), or a count the
 * section cannot hold, which rd_kafka_message_headers() refuses as a bad
 * message: either way it yields no header, as kawka reads it. 1 otherwise
 * (then ask rd_kafka_message_headers()).
 */
int kawka_message_may_have_headers(const rd_kafka_message_t *rkmessage) {
        /* rd_kafka_message_t is the first field of rd_kafka_msg_t
         * (rd_kafka_message2msg() casts the same way). */
        const rd_kafka_msg_t *rkm = (const rd_kafka_msg_t *)rkmessage;
        if (rkm->rkm_headers)
                return 1;
        if (rkm->rkm_flags & RD_KAFKA_MSG_F_PRODUCER)
                return 0;
        return RD_KAFKAP_BYTES_LEN(&rkm->rkm_u.consumer.binhdrs) > 1;
}

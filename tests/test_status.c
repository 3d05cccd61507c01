/* mma_strerror / mma_status_name: every code of MMA_STATUS_MAP has its own
 * sentence and symbolic name, and codes outside the map get the documented
 * fallbacks (never NULL), since callers print them unconditionally. */
#include <check.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "mma.h"

typedef struct {
    int value;
    const char *name; /* "MMA_ERR_RANGE" */
    const char *text;
} code_t;

static const code_t codes[] = {
#define X(name, value, text) {value, "MMA_" #name, text},
    MMA_STATUS_MAP(X)
#undef X
};
#define NCODES (sizeof codes / sizeof codes[0])

START_TEST(every_code_has_its_sentence_and_name)
{
    ck_assert_uint_ge(NCODES, 20);
    for (size_t i = 0; i < NCODES; i++) {
        const char *s = mma_strerror(codes[i].value);
        const char *n = mma_status_name(codes[i].value);
        ck_assert_ptr_nonnull(s);
        ck_assert_ptr_nonnull(n);
        ck_assert_msg(strlen(s) > 0, "empty sentence for %d", codes[i].value);
        ck_assert_str_eq(s, codes[i].text);
        ck_assert_str_eq(n, codes[i].name);
        ck_assert_str_ne(s, "unknown mma status");
        ck_assert_str_ne(n, "MMA_UNKNOWN");
    }
}
END_TEST

START_TEST(names_and_values_are_distinct)
{
    for (size_t i = 0; i < NCODES; i++)
        for (size_t j = i + 1; j < NCODES; j++) {
            ck_assert_int_ne(codes[i].value, codes[j].value);
            ck_assert_str_ne(mma_status_name(codes[i].value), mma_status_name(codes[j].value));
            ck_assert_str_ne(mma_strerror(codes[i].value), mma_strerror(codes[j].value));
        }
}
END_TEST

START_TEST(sign_convention)
{
    /* OK is 0, PENDING the only positive code, every error negative. */
    ck_assert_int_eq(MMA_OK, 0);
    ck_assert_int_gt(MMA_PENDING, 0);
    for (size_t i = 0; i < NCODES; i++)
        if (strncmp(codes[i].name, "MMA_ERR_", 8) == 0)
            ck_assert_msg(codes[i].value < 0, "%s is not negative", codes[i].name);
}
END_TEST

START_TEST(unknown_codes_get_fallbacks)
{
    const int unknown[] = {2, -20, -1000, 12345, INT_MIN, INT_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        ck_assert_str_eq(mma_strerror(unknown[i]), "unknown mma status");
        ck_assert_str_eq(mma_status_name(unknown[i]), "MMA_UNKNOWN");
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("status");
    TCase *tc = tcase_create("status");
    tcase_add_test(tc, every_code_has_its_sentence_and_name);
    tcase_add_test(tc, names_and_values_are_distinct);
    tcase_add_test(tc, sign_convention);
    tcase_add_test(tc, unknown_codes_get_fallbacks);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

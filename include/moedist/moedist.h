// moedist: portable MoE expert-parallel token exchange (dispatch_v2 / combine_v2).
#pragma once

#include "moedist/elastic.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/half.h"
#include "moedist/ops.h"
#include "moedist/reference.h"
#include "moedist/tensor.h"
#include "moedist/transport.h"
#include "moedist/ucx.h"
#include "moedist/version.h"

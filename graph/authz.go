// Authorization: what a run token may do.

package graph

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/auth"
	"rendezvous/engine"
)

// authorizer lets a run token resolve waitForEvent, waitForEventCallback
// and workflowRun on its own run only (and __typename). It decides on the fields gqlgen executes,
// never on a reading of the document of its own: gqlgen has already applied
// fragments, @skip/@include with the request's variables and operationName
// when it hands a field over, so no second parser can disagree with it.
//
// Three hooks, all failing closed (a missing principal, unknown rights or an
// operation without a root type are refused); the last suffices alone, and
// the differential harness (authz_diff_test.go) runs with it alone too:
//   - InterceptOperation, before anything runs, refuses the whole operation
//     if any root field is not allowed. It asks graphql.CollectFields, the
//     collection the executor itself uses (and caches on the operation
//     context: the executor gets the same slice back). It exists so that a
//     refused operation does nothing at all, not a part of it.
//   - InterceptRootField refuses, by name, a query or mutation root field
//     a run token may never use, before its arguments are read.
//   - InterceptField is the authority: it sees every field a resolver is
//     about to run for, with the argument values the resolver will get
//     (variables, defaults and scalars applied), including the subscription
//     field, which gqlgen does not pass through InterceptRootField.
type authorizer struct {
	// fieldCheckOnly: InterceptField alone decides (tests).
	fieldCheckOnly bool
}

var (
	_ graphql.HandlerExtension     = (*authorizer)(nil)
	_ graphql.OperationInterceptor = (*authorizer)(nil)
	_ graphql.RootFieldInterceptor = (*authorizer)(nil)
	_ graphql.FieldInterceptor     = (*authorizer)(nil)
)

func (*authorizer) ExtensionName() string { return "RunTokenAuthorization" }

func (*authorizer) Validate(es graphql.ExecutableSchema) error {
	if es.Schema() != parsedSchema {
		return errors.New("authorizer: knows the root types of this package's schema only")
	}
	return nil
}

func (a *authorizer) InterceptOperation(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	p := principal(ctx)
	if (p != nil && p.FullAccess()) || a.fieldCheckOnly {
		return next(ctx)
	}
	oc := graphql.GetOperationContext(ctx)
	refuse := func(path ast.Path, err error) graphql.ResponseHandler {
		return graphql.OneShot(&graphql.Response{Errors: gqlerror.List{{
			Message:    err.Error(),
			Path:       path,
			Extensions: errorExtensions(ctx, codeForbidden),
		}}})
	}
	fields, ok := collectRootFields(oc)
	if !ok {
		return refuse(nil, errors.New("this operation cannot be authorized"))
	}
	for _, f := range fields {
		if err := mayResolve(p, f.Name, f.ArgumentMap(oc.Variables)); err != nil {
			return refuse(ast.Path{ast.PathName(f.Alias)}, err)
		}
	}
	return next(ctx)
}

// collectRootFields lists the operation's root fields as the executor
// collects them (graphql.CollectFields caches its answer on the operation
// context, so the executor gets this very slice); ok is false when the
// operation has no root type.
func collectRootFields(oc *graphql.OperationContext) (fields []graphql.CollectedField, ok bool) {
	if oc == nil || oc.Operation == nil {
		return nil, false
	}
	var root *ast.Definition
	switch oc.Operation.Operation {
	case ast.Query:
		root = parsedSchema.Query
	case ast.Mutation:
		root = parsedSchema.Mutation
	case ast.Subscription:
		root = parsedSchema.Subscription
	}
	if root == nil {
		return nil, false
	}
	return graphql.CollectFields(oc, oc.Operation.SelectionSet, []string{root.Name}), true
}

// isRootType reports whether a field of the named type is a root field.
func isRootType(name string) bool {
	for _, d := range []*ast.Definition{parsedSchema.Query, parsedSchema.Mutation, parsedSchema.Subscription} {
		if d != nil && d.Name == name {
			return true
		}
	}
	return false
}

func (a *authorizer) InterceptRootField(ctx context.Context, next graphql.RootResolver) graphql.Marshaler {
	p := principal(ctx)
	if (p != nil && p.FullAccess()) || a.fieldCheckOnly {
		return next(ctx)
	}
	rfc := graphql.GetRootFieldContext(ctx)
	name := ""
	if rfc != nil && rfc.Field.Field != nil {
		name = rfc.Field.Name
	}
	if err := mayUse(p, name); err != nil {
		graphql.AddError(ctx, forbidden(err))
		return graphql.Null
	}
	return next(ctx)
}

func (a *authorizer) InterceptField(ctx context.Context, next graphql.Resolver) (any, error) {
	fc := graphql.GetFieldContext(ctx)
	if fc == nil {
		return nil, forbidden(errors.New("this field cannot be authorized"))
	}
	if !isRootType(fc.Object) {
		return next(ctx)
	}
	p := principal(ctx)
	if p != nil && p.FullAccess() {
		return next(ctx)
	}
	if err := mayResolve(p, fc.Field.Name, fc.Args); err != nil {
		return nil, forbidden(err)
	}
	return next(ctx)
}

// forbidden is a FORBIDDEN error for a field; the error presenter adds the
// request id and counts it.
func forbidden(err error) *gqlerror.Error {
	return &gqlerror.Error{Message: err.Error(), Extensions: map[string]any{"code": codeForbidden}}
}

func orUnknown(name string) string {
	if name == "" {
		return "this field"
	}
	return name
}

// mayUse decides whether p may use the root field at all, whatever its
// arguments: anything with full access; a run token __typename,
// waitForEvent, waitForEventCallback and workflowRun; nothing without a
// principal.
func mayUse(p *auth.Principal, name string) error {
	switch {
	case p == nil:
		return errors.New("the caller is not authenticated")
	case p.FullAccess():
		return nil
	case p.Kind != auth.Run || p.RunID == "":
		return errors.New("the caller's rights are unknown")
	case name == "__typename", name == "waitForEvent", name == "waitForEventCallback", name == "workflowRun":
		return nil
	}
	return fmt.Errorf("a run token may not use %s", orUnknown(name))
}

// mayResolve decides whether p may resolve the root field with the
// arguments: a run token waitForEvent, waitForEventCallback and
// workflowRun on its own run only.
func mayResolve(p *auth.Principal, name string, args map[string]any) error {
	if err := mayUse(p, name); err != nil || p.FullAccess() || name == "__typename" {
		return err
	}
	var id string
	switch v := args["workflowRunId"].(type) {
	case string:
		id = v
	case *string:
		if v != nil {
			id = *v
		}
	}
	if id != "" && !strings.HasPrefix(id, engine.RunIDPrefix) {
		id = engine.RunIDPrefix + id
	}
	if id != p.RunID {
		return fmt.Errorf("this run token allows %s on run %s only", name, p.RunID)
	}
	return nil
}
